"""Key names have one home (`engine.keys`): the Lua scripts name keys only through the prelude
generated from it, and every script call declares the keys it touches (checked in test mode)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from engine import market as market_module
from engine.keys import REGION_KEYS, Keys, id_tag, key_shape, lua_prelude, mint_id, region_tag
from engine.market import Market
from tests.engine.test_market import T0, a_node

LUA = Path(market_module.__file__).with_name("lua")
SCRIPTS = sorted(LUA.glob("*.lua"))


def _code_and_strings(source: str) -> tuple[str, list[str]]:
    """The source without its comments and string literals (each replaced by a space), and the
    string literals. Enough Lua for our scripts: '...' and "..." with escapes, `--` comments."""
    code, strings, i = [], [], 0
    while i < len(source):
        c = source[i]
        if source.startswith("--", i):
            i = source.find("\n", i)
            i = len(source) if i < 0 else i
        elif c in "'\"":
            j = i + 1
            while source[j] != c:
                j += 2 if source[j] == "\\" else 1
            strings.append(source[i + 1 : j])
            code.append(" ")
            i = j + 1
        else:
            code.append(c)
            i += 1
    return "".join(code), strings


def test_no_script_spells_a_key() -> None:
    """No .lua file builds a key name itself: the region's prefix (`TAG`, ARGV[1]) appears in
    none, nor any literal with a part of a key's shape that names an object's key."""
    object_parts = {p for name in REGION_KEYS for p in key_shape(name) if ":" in p}
    assert object_parts >= {"node:", ":contracts", "bid:", "contract:", "client:"}
    for path in SCRIPTS:
        code, strings = _code_and_strings(path.read_text())
        assert not re.search(r"\bTAG\b|ARGV\[1\]", code), f"{path.name} builds a key name"
        for s in strings:
            assert not any(part in s for part in object_parts), f"{path.name} spells {s!r}"


def test_no_script_touches_a_global_key() -> None:
    """No script names a key outside the region's slot, nor reads a KEYS entry by position:
    every key comes from `K` (the region's), so a cluster accepts every call."""
    for path in SCRIPTS:
        code, _ = _code_and_strings(path.read_text())
        assert not re.search(r"KEYS\[\d", code), f"{path.name} reads KEYS by position"
        assert not re.search(r"\b(DIRECTORY|REGIONS)\b", code), f"{path.name} names a global"


def test_minted_ids_carry_their_region() -> None:
    """`mint_id(region)` is a UUID version 8 whose tag `id_tag` reads back as the region's;
    ids minted otherwise (uuid4, a caller's own) carry none."""
    import uuid

    for region in ("us-east-2", "eu-west-1", "é"):
        ids = {mint_id(region) for _ in range(1000)}
        assert len(ids) == 1000
        for i in ids:
            parsed = uuid.UUID(i)
            assert parsed.hex == i and parsed.version == 8 and parsed.variant == uuid.RFC_4122
            assert id_tag(i) == region_tag(region)
    assert region_tag("us-east-2") != region_tag("us-east-1")
    for other in (uuid.uuid4().hex, "n1", "", mint_id("r").upper(), mint_id("r")[:-1]):
        assert id_tag(other) is None


def test_region_keys_cover_every_region_key_method() -> None:
    """REGION_KEYS (what the scripts may name) lists every `Keys` method that names a key of
    a region's slot, so a new key shape is generated for Lua too."""
    keys = Keys("\x00")
    tag = keys.tag("\x01")
    region_methods = set()
    for name in dir(Keys):
        attr = getattr(keys, name)
        if name.startswith("_") or name in {"tag", "each"} or not callable(attr):
            continue
        try:
            built = attr("\x01")
        except TypeError:
            built = attr("\x01", "\x02")
        if built.startswith(tag):
            region_methods.add(name)
    assert region_methods == set(REGION_KEYS)


async def test_lua_prelude_names_keys_as_keys_does(redis: aioredis.Redis, keys: Keys) -> None:
    """The generated Lua, run by the server, builds exactly the names `Keys` builds."""
    region, object_id = "eu-west-1", "obj-1.x_Y"
    takes_id = {name for name in REGION_KEYS if len(key_shape(name)) > 1}
    names = sorted(REGION_KEYS)
    body = ", ".join(f"K.{n}('{object_id}')" if n in takes_id else f"K.{n}" for n in names)
    got = await redis.eval(lua_prelude() + f"return {{{body}}}", 0, keys.tag(region))
    want = [
        getattr(keys, n)(region, object_id) if n in takes_id else getattr(keys, n)(region)
        for n in names
    ]
    assert [g.decode() for g in got] == want


def test_each_builds_the_keys_of_each_id() -> None:
    """Keys.each(build, ...) equals build(region, id) per id, encoded."""
    keys = Keys("p:")
    ids = ["n1", "node-2", "é"]
    for name in REGION_KEYS:
        if len(key_shape(name)) > 1:
            build = getattr(keys, name)
            assert keys.each(build, "r", ids) == [build("r", i).encode() for i in ids]


async def test_test_mode_refuses_an_undeclared_key(redis: aioredis.Redis, keys: Keys) -> None:
    """With CHECK_DECLARED_KEYS (on in these tests) a script that touches a key missing from
    its KEYS fails before touching it, and a call declaring keys of two slots is refused."""
    assert market_module.CHECK_DECLARED_KEYS
    market = Market(redis, keys)
    await market.load_scripts()
    await market.register_node(a_node(), T0)
    head = [keys.tag("us-east-2"), "us-east-2", T0]
    with pytest.raises(ResponseError, match=r"undeclared key .*node:n1"):
        await market._eval("deactivate", [keys.seq("us-east-2")], [*head, "n1"])
    assert (await market.get_node("n1")).status == "active"  # type: ignore[union-attr]
    with pytest.raises(RuntimeError, match="2 slots"):
        await market._eval("deactivate", [keys.seq("us-east-2"), keys.seq("eu")], [*head, "n1"])
