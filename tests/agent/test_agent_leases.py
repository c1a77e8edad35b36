"""The agent's capacity arithmetic and its lease record, against the engine's accounting."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.leases import LeaseBook, available_gb
from gateway.protocol import ContractOut, ContractStatus


def contract(
    cid: str, ram: int, vram: int = 0, end_ms: int = 10_000, status: ContractStatus = "active"
) -> ContractOut:
    """A contract as the gateway sends it (REST's list, a notice's `contract`)."""
    return ContractOut(
        contract_id=cid,
        client_id="client",
        node_id="node",
        region="us-east-2",
        ram_gb=ram,
        vram_gb=vram,
        duration_sec=600,
        start_ms=end_ms - 600_000,
        end_ms=end_ms,
        price_per_gb_sec=1e-6,
        egress_price_per_gb=0.0,
        max_price_per_gb_sec=1e-6,
        status=status,
        bid_id=None,
        predecessor_id=None,
        successor_id=None,
        extensions=0,
        used_sec=0,
        egress_gb=0.0,
        total_cost_usd=0.0,
        settlement_hash=None,
        completed_ms=0,
        price_pusd=1_000_000,
        max_price_pusd=1_000_000,
    )


def test_available_subtracts_leases_from_the_capped_free_memory() -> None:
    """available = max(0, min(free, limit) - leased); outside the schedule 0."""
    assert available_gb(48, None, 0, idle=True) == 48
    assert available_gb(48, 16, 0, idle=True) == 16
    assert available_gb(48, 16, 10, idle=True) == 6
    assert available_gb(48, 16, 16, idle=True) == 0
    assert available_gb(8, 16, 10, idle=True) == 0  # never negative
    assert available_gb(48, None, 4, idle=False) == 0


def test_memory_held_by_lease_servers_is_not_subtracted_twice() -> None:
    """A 16 GB lease whose server holds 10 GB: `free` dropped by 10 and the lease subtracts 16;
    adding the held 10 back gives the offer the empty lease gave (nothing counted twice)."""
    empty = available_gb(48, None, 16, idle=True)
    assert empty == 32
    assert available_gb(38, None, 16, idle=True, held_gb=10) == empty
    assert available_gb(38, None, 16, idle=True) == 22  # without the rule: under-offered by 10
    assert available_gb(38, 40, 16, idle=True, held_gb=10) == 24  # the owner's limit holds


@given(
    total=st.integers(0, 512),
    free_frac=st.floats(0, 1),
    limit=st.none() | st.integers(0, 512),
    leases=st.lists(st.integers(0, 64), max_size=6),
    idle=st.booleans(),
)
def test_engine_accounting_holds_for_any_report(
    total: int, free_frac: float, limit: int | None, leases: list[int], idle: bool
) -> None:
    """With the engine's offered = min(total, available + reserved), reserved + available ==
    offered <= total, and while idle the owner's limit holds unless leases already exceed it."""
    free = int(total * free_frac)
    leased = sum(leases)
    available = available_gb(free, limit, leased, idle=idle)
    reserved = leased  # the engine's reserved equals the agent's leased record
    offered = min(total, available + reserved)
    assert available >= 0
    assert offered <= total
    engine_available = max(0, offered - reserved)
    assert engine_available <= available
    if idle and leased <= min(free, limit if limit is not None else free):
        assert offered == min(total, free, limit if limit is not None else total)


def test_notices_maintain_the_lease_record() -> None:
    """started adds, extended updates, ending keeps, ended and failed over remove; idempotent."""
    book = LeaseBook()
    book.apply("contract_started", contract("a", 8, 4))
    book.apply("contract_started", contract("a", 8, 4))
    book.apply("contract_started", contract("b", 2, 0))
    assert (book.leased_ram_gb, book.leased_vram_gb) == (10, 4)
    book.apply("contract_extended", contract("a", 8, 4, end_ms=20_000))
    book.apply("contract_ending", contract("a", 8, 4, end_ms=20_000))
    assert len(book) == 2 and book.leases()[0].end_ms == 20_000
    book.apply("contract_ended", contract("a", 8, 4, status="completed"))
    book.apply("contract_ended", contract("a", 8, 4, status="completed"))
    assert (book.leased_ram_gb, book.leased_vram_gb) == (2, 0)
    book.apply("contract_failed_over", contract("b", 2, 0, status="failed_over"))
    assert len(book) == 0


def test_resync_and_prune() -> None:
    """replace() keeps only active contracts; prune() drops leases long past their end."""
    book = LeaseBook()
    book.apply("contract_started", contract("old", 4, 0))
    book.replace(
        [
            contract("x", 1, 1, end_ms=1_000),
            contract("y", 2, 0, status="completed"),
            contract("z", 3, 0),
        ]
    )
    assert "old" not in book and "y" not in book
    assert book.leased_ram_gb == 4
    gone = book.prune(now_ms=70_000, grace_ms=60_000)
    assert [g.contract_id for g in gone] == ["x"]
    assert book.leased_ram_gb == 3
