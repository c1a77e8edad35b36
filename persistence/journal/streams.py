"""The regions' event streams as the journal reads them: its consumer group, and the raw
replies of the stream commands (read as the server sends them, without redis-py's parsing).
"""

from __future__ import annotations

from typing import Any

__all__ = ["GROUP"]

# The stream entries' shape (the `e` field, the reply formats, entry ids) is `engine.log`'s.

GROUP = "journal"
"""The consumer group every journal worker joins on every region's stream."""
_GROUP_B = GROUP.encode()


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode()
    return None if value is None else str(value)
