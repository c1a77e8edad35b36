"""The journal's package keeps its seams: a caller that needs one of its concepts loads only that
one and what it builds on (the gateway's `/metrics` does not load the worker or the fold)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_HEAVY = (
    "persistence.journal.worker",
    "persistence.journal.fold",
    "persistence.journal.rows",
    "persistence.journal.batch",
    "persistence.journal.replay",
)


def _journal_modules_after(statement: str) -> set[str]:
    # A fresh interpreter: this one has imported the whole journal through the other tests.
    code = (
        f"import json, sys; {statement}; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('persistence.journal'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize(
    ("statement", "needed"),
    [
        ("import gateway.app", {"persistence.journal.lag", "persistence.journal.status"}),
        ("import persistence.rebuild", {"persistence.journal.stored"}),
        ("import persistence.journal.lag", {"persistence.journal.lag"}),
    ],
)
def test_light_importers_load_neither_the_worker_nor_the_fold(
    statement: str, needed: set[str]
) -> None:
    """The gateway, `rebuild-live` and the lag load what they use of the journal, not the rest."""
    loaded = _journal_modules_after(statement)
    assert needed <= loaded
    assert not loaded & set(_HEAVY), sorted(loaded & set(_HEAVY))


def test_the_package_itself_imports_none_of_its_modules() -> None:
    """`import persistence.journal` loads its docstring only; callers name the module they use."""
    assert _journal_modules_after("import persistence.journal") == {"persistence.journal"}
