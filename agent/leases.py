"""What Mnemo leases from this node, and the capacity the agent reports in each heartbeat.

The engine's accounting (engine/types.py, quoted): a heartbeat's `available_*_gb` is "memory I
could lend to Mnemo right now, NOT counting what Mnemo already leases from me"; the engine stores
`offered = min(total, available + reserved)` and `available = offered - reserved`.

So the agent reports, per kind of memory (RAM, VRAM), outside the idle schedule 0, otherwise

    available = max(0, min(free + held, limit) - leased)

- `free`: what the machine has free now (psutil `available`, NVML free, floored to GiB);
- `held`: memory the node's lease servers occupy for their leases' data (RAM only), floored to
  GiB: each server's resident memory above the empty server's, at most its lease's size
  (`agent.delivery.Delivery.used_bytes`);
- `limit`: the owner's `max_*_gb`, the most Mnemo may hold in total (unset: no limit);
- `leased`: the sum over the contracts on this node that the agent knows to be active.

A RAM lease is delivered: its own Valkey server (`agent.lease_server`) holds the renter's data,
so as the renter fills it, `free` drops. That memory is already inside `leased` (each lease
counts in full from its start, filled or not), so `held` adds it back: without it, a full
lease would be subtracted twice and the node would under-offer by the lease's size. `held` is
capped at each lease's size, so memory a server takes beyond its lease (allocator overhead, the
empty server itself, a few MB) stays subtracted: the node may under-offer by that much, never
over-offer. A VRAM lease is reserved, not delivered: nothing occupies the memory, `free`
still counts it, and `leased` alone subtracts it. With the engine's `reserved == leased` the
node's total offer becomes `min(total, free + held, limit)` -- the owner's limit holds with
leases included.

`LeaseBook` keeps the record from the `node:<id>` notices (`gateway.protocol.ContractNotice`)
and is resynchronised from the gateway's contract list whenever the agent (re)connects, since
notices sent while it was away are lost; both carry the same `ContractOut`. Pure: no clock, no
I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from gateway.protocol import ContractNoticeKind, ContractOut

__all__ = ["Lease", "LeaseBook", "available_gb"]

_ENDING_NOTICES = frozenset({"contract_ended", "contract_failed_over"})


def available_gb(
    free_gb: int, limit_gb: int | None, leased_gb: int, *, idle: bool, held_gb: int = 0
) -> int:
    """The `available_*_gb` a heartbeat carries (see the module docstring for the formula)."""
    if not idle:
        return 0
    lendable = free_gb + held_gb
    cap = lendable if limit_gb is None else min(lendable, limit_gb)
    return max(0, cap - leased_gb)


class Lease(msgspec.Struct, kw_only=True):
    """One active contract on this node, as the agent knows it."""

    contract_id: str
    ram_gb: int
    vram_gb: int
    end_ms: int = 0
    client_id: str | None = None


def _lease_from(contract: ContractOut) -> Lease:
    return Lease(
        contract_id=contract.contract_id,
        ram_gb=contract.ram_gb,
        vram_gb=contract.vram_gb,
        end_ms=contract.end_ms,
        client_id=contract.client_id,
    )


class LeaseBook:
    """The active leases on one node, kept from notices and resynchronised from the gateway."""

    __slots__ = ("_leases",)

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, contract_id: object) -> bool:
        return contract_id in self._leases

    @property
    def leased_ram_gb(self) -> int:
        return sum(lease.ram_gb for lease in self._leases.values())

    @property
    def leased_vram_gb(self) -> int:
        return sum(lease.vram_gb for lease in self._leases.values())

    def leases(self) -> list[Lease]:
        return list(self._leases.values())

    def apply(self, notice: ContractNoticeKind, contract: ContractOut) -> Lease:
        """Apply one notice; returns the lease it concerned.

        Idempotent: a repeated start or end changes nothing. `contract_ending` is only a
        warning: the lease holds until `contract_ended` (or `contract_failed_over`).
        """
        lease = _lease_from(contract)
        if notice in _ENDING_NOTICES or contract.status != "active":
            self._leases.pop(lease.contract_id, None)
        elif notice in ("contract_started", "contract_extended", "contract_ending"):
            self._leases[lease.contract_id] = lease
        return lease

    def replace(self, contracts: Iterable[ContractOut]) -> None:
        """Reset the record to the given contracts (those not active are ignored)."""
        self._leases = {c.contract_id: _lease_from(c) for c in contracts if c.status == "active"}

    def prune(self, now_ms: int, grace_ms: int) -> list[Lease]:
        """Forget leases whose end passed more than `grace_ms` ago (their end notice was lost).

        The engine settles a contract once its end passes; the grace covers its settle delay.
        """
        gone = [
            lease
            for lease in self._leases.values()
            if lease.end_ms and lease.end_ms + grace_ms < now_ms
        ]
        for lease in gone:
            del self._leases[lease.contract_id]
        return gone
