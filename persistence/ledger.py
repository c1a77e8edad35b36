"""The double-entry ledger (issue 14): accounts, balanced movements, balances.

Rules (the schema is persistence/migrations/008_ledger.sql):
- A movement is a set of entries in integer pico-USD that sums to zero, written in ONE
  transaction with its cause under a unique key: writing a key that exists writes nothing and
  answers False, so a retry (a redelivered event, a replayed webhook, a payout retried after a
  lost reply) cannot move money twice. Postgres refuses an unbalanced movement (a statement
  trigger) and any update or delete of the book.
- An account's balance is the sum of its entries (`balance`, the `ledger_balances` view).
- The journal writes the movements of the market's events (`movements_of`, keys
  `event:<event id>`, and `credit:<key>` / `debit:<key>` for credits and debits, whose caller's
  key is what dedupes them); everything that moves money in Postgres alone (a provider's payout,
  a correction) goes through `post_movement`.

Account names (`client_funding`, `client_region`, ...) say what each account is; a rail's
account (`rail(...)`) is minus what came in through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple, assert_never

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from engine.keys import FUNDING
from engine.types import (
    BidCancelled,
    BidExpired,
    BidPlaced,
    ContractCreated,
    ContractExtended,
    ContractSettled,
    Event,
    HeartbeatsApplied,
    LeaseChanged,
    NodeDeactivated,
    NodeOffline,
    NodeRegistered,
    NodeUpdated,
    StakeChanged,
    TransferReceived,
    TransferSent,
    TrustUpdated,
    WalletCredited,
    WalletDebited,
)

__all__ = [
    "PLATFORM_FEE",
    "Account",
    "Entry",
    "Movement",
    "UnbalancedMovement",
    "balance",
    "balances",
    "client_funding",
    "client_held",
    "client_region",
    "client_slot",
    "client_transit",
    "movements_of",
    "post_movement",
    "provider",
    "rail",
    "stake",
    "stake_transit",
    "write_movements",
]


_Conn = asyncpg.Connection | PoolConnectionProxy


class Account(NamedTuple):
    """A ledger account: its name (the key), its kind, whom it belongs to, its region."""

    name: str
    kind: str
    owner_id: str | None = None
    region: str | None = None


def client_funding(client_id: str) -> Account:
    """The renter's funding wallet (credits land here)."""
    return Account(f"client:{client_id}:funding", "client_funding", client_id)


def client_region(client_id: str, region: str) -> Account:
    """The renter's spendable money in `region`."""
    return Account(f"client:{client_id}:region:{region}", "client_region", client_id, region)


def client_held(client_id: str, region: str) -> Account:
    """The holds of the renter's open contracts and bids in `region`."""
    return Account(f"client:{client_id}:held:{region}", "client_held", client_id, region)


def client_transit(client_id: str) -> Account:
    """The renter's money between two of its wallets (a transfer sent, not yet received)."""
    return Account(f"client:{client_id}:transit", "client_transit", client_id)


def client_slot(client_id: str, slot: str) -> Account:
    """The renter's wallet in a slot: the funding wallet or a region's."""
    return client_funding(client_id) if slot == FUNDING else client_region(client_id, slot)


def provider(user_id: str) -> Account:
    """A provider's earnings not yet paid out."""
    return Account(f"provider:{user_id}", "provider", user_id)


def rail(name: str) -> Account:
    """An external rail (`stripe`, `eth`, `sol`, `operator`): minus what came in through it."""
    return Account(f"rail:{name}", "rail")


def stake(node_id: str, owner_id: str) -> Account:
    """The stake locked for a node (engine.trust): it pays renters' SLA credits."""
    return Account(f"stake:{node_id}", "stake", owner_id)


def stake_transit(node_id: str, owner_id: str) -> Account:
    """A stake lock between the provider's earnings and the node's stake (engine.trust: the
    gateway moves the amount here, then the market's script into the stake)."""
    return Account(f"stake_transit:{node_id}", "stake_transit", owner_id)


PLATFORM_FEE = Account("platform:fee", "platform_fee")
"""The platform's fees, taken at settlement (`MNEMO_PLATFORM_FEE_BPS`)."""


class Entry(NamedTuple):
    account: Account
    amount_pusd: int


class Movement(NamedTuple):
    """A balanced set of entries under a unique key, with its cause and context."""

    key: str
    cause: str
    entries: tuple[Entry, ...]
    ts_ms: int
    event_id: str | None = None
    client_id: str | None = None
    contract_id: str | None = None
    reference: str | None = None
    reason: str | None = None
    payment: tuple[str, str, int] | None = None
    """For the `transactions` table: (kind, payment method, amount), or None."""


class UnbalancedMovement(ValueError):
    """The entries of a movement do not sum to zero (or it has none)."""


def _movement(
    key: str, cause: str, entries: Iterable[tuple[Account, int]], ts_ms: int, **context: Any
) -> Movement | None:
    merged: dict[Account, int] = {}
    for account, amount in entries:
        merged[account] = merged.get(account, 0) + amount
    kept = tuple(Entry(a, v) for a, v in merged.items() if v)
    if not kept:
        return None
    return Movement(key, cause, kept, ts_ms, **context)


def movements_of(event: Event) -> list[Movement]:
    """The ledger movements of a market event (none for events that move no money). Keys derive
    from the event, so folding it again writes nothing new."""
    key = f"event:{event.event_id}"
    at = event.ts_ms
    out: list[Movement | None] = []
    match event:
        case WalletCredited():
            out.append(
                _movement(
                    f"credit:{event.key}",
                    "credit",
                    [
                        (rail(event.rail), -event.amount_pusd),
                        (client_funding(event.client_id), event.amount_pusd),
                    ],
                    at,
                    event_id=event.event_id,
                    client_id=event.client_id,
                    reference=event.reference or None,
                    reason=event.reason or None,
                    payment=("topup", event.rail, event.amount_pusd),
                )
            )
        case WalletDebited():
            out.append(
                _movement(
                    f"debit:{event.key}",
                    "debit",
                    [
                        (client_funding(event.client_id), -event.amount_pusd),
                        (rail(event.rail), event.amount_pusd),
                    ],
                    at,
                    event_id=event.event_id,
                    client_id=event.client_id,
                    reference=event.reference or None,
                    reason=event.reason or None,
                    payment=("debit", event.rail, event.amount_pusd),
                )
            )
        case TransferSent():
            c = event.client_id
            out.append(
                _movement(
                    key,
                    "transfer_out",
                    [
                        (client_slot(c, event.region), -event.amount_pusd),
                        (client_transit(c), event.amount_pusd),
                    ],
                    at,
                    event_id=event.event_id,
                    client_id=c,
                    reference=event.transfer_id,
                )
            )
        case TransferReceived():
            c = event.client_id
            out.append(
                _movement(
                    key,
                    "transfer_in",
                    [
                        (client_transit(c), -event.amount_pusd),
                        (client_slot(c, event.region), event.amount_pusd),
                    ],
                    at,
                    event_id=event.event_id,
                    client_id=c,
                    reference=event.transfer_id,
                )
            )
        case BidPlaced(bid=bid):
            if event.wallet is None:
                return []  # placed before issue 14: nothing held
            out.append(
                _hold(key, "hold", bid.client_id, event.region, bid.hold_pusd, at, event.event_id)
            )
        case BidCancelled() | BidExpired():
            if event.wallet is None:
                return []
            out.append(
                _hold(
                    key,
                    "release",
                    event.wallet.client_id,
                    event.region,
                    -event.released_pusd,
                    at,
                    event.event_id,
                )
            )
        case ContractCreated(contract=c):
            if event.wallet is None:
                return []  # a failover's successor (its hold moved with it), or pre-issue 14
            if event.bid_id is not None:
                out.append(
                    _hold(
                        key,
                        "fill",
                        c.client_id,
                        event.region,
                        -event.released_pusd,
                        at,
                        event.event_id,
                        c.contract_id,
                    )
                )
            else:
                out.append(
                    _hold(
                        key,
                        "hold",
                        c.client_id,
                        event.region,
                        c.hold_pusd,
                        at,
                        event.event_id,
                        c.contract_id,
                    )
                )
        case ContractExtended():
            if event.wallet is None:
                return []
            out.append(
                _hold(
                    key,
                    "extend",
                    event.wallet.client_id,
                    event.region,
                    event.hold_pusd,
                    at,
                    event.event_id,
                    event.contract_id,
                )
            )
        case ContractSettled():
            if event.wallet is None:
                return []
            c, r = event.client_id, event.region
            out.append(
                _movement(
                    key,
                    "settle",
                    [
                        (client_held(c, r), -(event.hold_pusd - event.moved_pusd)),
                        (client_region(c, r), event.released_pusd - event.charged_pusd),
                        (
                            provider(event.owner_id),
                            event.cost_pusd - event.fee_pusd - event.stake_held_pusd,
                        ),
                        (stake(event.node_id, event.owner_id), event.stake_held_pusd),
                        (PLATFORM_FEE, event.fee_pusd),
                    ],
                    at,
                    event_id=event.event_id,
                    client_id=c,
                    contract_id=event.contract_id,
                    payment=("charge", "balance", event.cost_pusd) if event.cost_pusd else None,
                )
            )
            if event.sla_credit_pusd:
                # engine.trust: the renter's SLA credit, out of the node's stake (once per
                # contract: the contract closes once)
                out.append(
                    _movement(
                        f"{key}:sla",
                        "sla_credit",
                        [
                            (stake(event.node_id, event.owner_id), -event.sla_credit_pusd),
                            (client_region(c, r), event.sla_credit_pusd),
                        ],
                        at,
                        event_id=event.event_id,
                        client_id=c,
                        contract_id=event.contract_id,
                    )
                )
        case (
            NodeRegistered()
            | NodeUpdated()
            | NodeDeactivated()
            | HeartbeatsApplied()
            | NodeOffline()
        ):
            return []  # nodes move no money
        case LeaseChanged():
            return []  # a lease's delivery moves no money (its settlement does)
        case TrustUpdated():
            return []  # uptime moves no money
        case StakeChanged():
            if event.kind == "lock":
                entries = [
                    (stake_transit(event.node_id, event.owner_id), -event.amount_pusd),
                    (stake(event.node_id, event.owner_id), event.amount_pusd),
                ]
            else:
                entries = [
                    (stake(event.node_id, event.owner_id), -event.amount_pusd),
                    (provider(event.owner_id), event.amount_pusd),
                ]
            out.append(
                _movement(
                    key,
                    f"stake_{event.kind}",
                    entries,
                    at,
                    event_id=event.event_id,
                )
            )
        case _:
            assert_never(event)
    return [m for m in out if m is not None]


def _hold(
    key: str,
    cause: str,
    client_id: str,
    region: str,
    amount: int,
    ts_ms: int,
    event_id: str,
    contract_id: str | None = None,
) -> Movement | None:
    """`amount` from the region's wallet into its holds (negative: back out of them)."""
    return _movement(
        key,
        cause,
        [(client_region(client_id, region), -amount), (client_held(client_id, region), amount)],
        ts_ms,
        event_id=event_id,
        client_id=client_id,
        contract_id=contract_id,
    )


def _check(movement: Movement) -> None:
    if not movement.entries:
        raise UnbalancedMovement(f"movement {movement.key} has no entries")
    total = sum(e.amount_pusd for e in movement.entries)
    if total:
        raise UnbalancedMovement(f"movement {movement.key} is off by {total} pico-USD")


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


# One statement for the accounts, one for movements + entries (its CTE hands the entries only
# the movements it inserted: a key already written writes no entry), one for transactions.
_ACCOUNTS_SQL = """
INSERT INTO ledger_accounts (account, kind, owner_id, region)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
ON CONFLICT DO NOTHING
"""
_MOVEMENTS_SQL = """
WITH m AS (
    INSERT INTO ledger_movements (key, cause, event_id, client_id, contract_id, reference,
                                  reason, ts)
    SELECT k, c, ev, cl, co, ref, why, 'epoch'::timestamptz + ms * interval '1 millisecond'
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                $7::text[], $8::int8[]) AS u(k, c, ev, cl, co, ref, why, ms)
    ON CONFLICT DO NOTHING
    RETURNING key
)
INSERT INTO ledger_entries (movement, line, account, amount_pusd)
SELECT e.movement, e.line, e.account, e.amount
FROM unnest($9::text[], $10::int2[], $11::text[], $12::int8[]) AS e(movement, line, account, amount)
JOIN m ON m.key = e.movement
"""
_PAYMENTS_SQL = """
INSERT INTO transactions (client_id, contract_id, amount_pusd, payment_method, status, kind,
                          movement_key, reference, reason, created_at, settled_at)
SELECT cl::uuid, co::uuid, amount, method, 'completed', kind, k, ref, why,
       'epoch'::timestamptz + ms * interval '1 millisecond',
       'epoch'::timestamptz + ms * interval '1 millisecond'
FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], $6::text[],
            $7::text[], $8::text[], $9::int8[]) AS u(cl, co, amount, method, kind, k, ref, why, ms)
ON CONFLICT (movement_key) DO NOTHING
"""


def statements(movements: Sequence[Movement]) -> list[tuple[str, list[list[Any]]]]:
    """The statements that write `movements` (checked balanced first), for a caller that runs
    them in its own transaction (the journal's batch)."""
    if not movements:
        return []
    accounts: dict[str, Account] = {}
    cols: list[list[Any]] = [[] for _ in range(12)]
    pay: list[list[Any]] = [[] for _ in range(9)]
    for m in movements:
        _check(m)
        for i, value in enumerate(
            (m.key, m.cause, m.event_id, m.client_id, m.contract_id, m.reference, m.reason, m.ts_ms)
        ):
            cols[i].append(value)
        for line, entry in enumerate(m.entries):
            accounts[entry.account.name] = entry.account
            cols[8].append(m.key)
            cols[9].append(line)
            cols[10].append(entry.account.name)
            cols[11].append(entry.amount_pusd)
        if m.payment is not None:
            kind, method, amount = m.payment
            for i, value in enumerate(
                (
                    m.client_id,
                    m.contract_id,
                    amount,
                    method,
                    kind,
                    m.key,
                    m.reference,
                    m.reason,
                    m.ts_ms,
                )
            ):
                pay[i].append(value)
    ordered = sorted(accounts.values())
    out: list[tuple[str, list[list[Any]]]] = [
        (_ACCOUNTS_SQL, [[a.name for a in ordered], [a.kind for a in ordered],
                         [a.owner_id for a in ordered], [a.region for a in ordered]]),
        (_MOVEMENTS_SQL, cols),
    ]  # fmt: skip
    if pay[0]:
        out.append((_PAYMENTS_SQL, pay))
    return out


async def write_movements(conn: _Conn, movements: Sequence[Movement]) -> None:
    """Write movements inside the caller's transaction (each key at most once)."""
    for sql, args in statements(movements):
        await conn.execute(sql, *args)


async def post_movement(
    conn: _Conn | asyncpg.Pool,
    key: str,
    cause: str,
    entries: Iterable[tuple[Account, int]],
    *,
    ts_ms: int | None = None,
    client_id: str | None = None,
    contract_id: str | None = None,
    reference: str | None = None,
    reason: str | None = None,
    payment: tuple[str, str, int] | None = None,
) -> bool:
    """Write one balanced movement, idempotent on `key`: True if it was written now, False if
    the key was already in the book (nothing written). UnbalancedMovement if the entries do not
    sum to zero. For movements that happen in Postgres alone (a provider's payout:
    `[(provider(u), -x), (rail("stripe"), x)]`); money in the live market moves through its
    scripts, whose events the journal writes. Runs in its own transaction unless `conn` is
    already in one (then it is part of the caller's, e.g. with the payout's own rows).
    `payment` (kind, method, amount) also writes a `transactions` row."""
    movement = _movement(
        key,
        cause,
        entries,
        int(datetime.now(UTC).timestamp() * 1000) if ts_ms is None else ts_ms,
        client_id=client_id,
        contract_id=contract_id,
        reference=reference,
        reason=reason,
        payment=payment,
    )
    if movement is None:
        raise UnbalancedMovement(f"movement {key} has no entries")
    _check(movement)
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as c:
            return await _post(c, movement)
    return await _post(conn, movement)


async def _post(conn: _Conn, movement: Movement) -> bool:
    accounts, entries, *payment = statements([movement])
    async with conn.transaction():
        await conn.execute(accounts[0], *accounts[1])
        # A concurrent writer of the same key makes this wait, then insert nothing.
        written = await conn.fetch(entries[0] + " RETURNING movement", *entries[1])
        if not written:
            return False
        for sql, args in payment:
            await conn.execute(sql, *args)
        return True


async def balance(conn: asyncpg.Connection | asyncpg.Pool, account: Account | str) -> int:
    """An account's balance: the sum of its entries (0 for an account with none)."""
    name = account if isinstance(account, str) else account.name
    value = await conn.fetchval(
        "SELECT coalesce(sum(amount_pusd), 0)::numeric FROM ledger_entries WHERE account = $1",
        name,
    )
    return int(value)


async def balances(conn: asyncpg.Connection | asyncpg.Pool, prefix: str = "") -> dict[str, int]:
    """Every account's balance whose name starts with `prefix` (all accounts by default)."""
    rows = await conn.fetch(
        "SELECT account, balance_pusd FROM ledger_balances WHERE starts_with(account, $1)",
        prefix,
    )
    return {r["account"]: int(r["balance_pusd"]) for r in rows}
