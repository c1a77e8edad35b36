"""Wire conversions: USD floats <-> integer pico-USD."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engine.types import pusd, usd
from gateway.schemas import to_pusd, to_usd


@given(st.integers(min_value=-(2**63), max_value=2**63))
def test_to_usd_is_the_double_nearest_the_exact_amount(amount: int) -> None:
    """The fast path (division) gives the same double as the exact Decimal conversion."""
    assert to_usd(amount) == float(usd(amount))


@given(st.integers(min_value=0, max_value=10**15))
def test_prices_round_trip(amount: int) -> None:
    """A price sent back as it was shown is the same price."""
    assert to_pusd(to_usd(amount)) == amount == pusd(repr(to_usd(amount)))
