"""What a replay cannot rebuild, by design (README, "Scaling out"): claims that name nothing."""

from __future__ import annotations

from typing import Any


def without_empty_claims(live: dict[str, Any], rebuilt: dict[str, Any]) -> dict[str, Any]:
    """`live` less what no event records: the `dir` claim of an id whose object was never made
    (the market claims an untagged id, and lists its region, before the script, which may then
    refuse it: 402, 429) and the listing of a region with no node or bid. Both name nothing
    (`engine.keys`: a lookup finds no object); anything else must rebuild exactly."""
    out = {}
    for region, snap in live.items():
        snap = dict(snap)
        again = rebuilt.get(region, {})

        def made(object_id: str, snap: dict[str, Any] = snap) -> bool:
            return any(f"{kind}:{object_id}" in snap for kind in ("node", "bid", "contract"))

        if "@dir" in snap:
            snap["@dir"] = {
                i: r for i, r in snap["@dir"].items() if i in again.get("@dir", {}) or made(i)
            }
        if snap.get("@regions") and not again.get("@regions"):
            if not any(n.startswith(("node:", "bid:")) for n in snap):
                snap["@regions"] = again.get("@regions", False)
        out[region] = snap
    return out
