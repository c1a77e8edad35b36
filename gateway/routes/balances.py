"""Money (issue 14): a renter's balance, and the operators' credits, clawbacks and credit lines.

Who may do what:
- a balance: the client's user and admins (`GET /api/clients/{id}/balance`), or all of the
  caller's clients at once (`GET /api/accounts/me/balance`);
- credit, clawback and credit line: admins only (`/api/admin/accounts/{client_id}/...`). Each
  credit or clawback is one movement in the ledger, on the `operator` rail, with its reason,
  applied once per `key` (a retry answers the first result with `applied: false`).
How money moves is `gateway.money`'s and `engine.market`'s (section "money").
"""

from __future__ import annotations

from engine.errors import NotFound
from gateway.errors import ValidationFailed
from gateway.money import balance_of
from gateway.operations import Call, Operation
from gateway.routes.accounts import client_ids_of, owned_client
from gateway.schemas import (
    BalanceList,
    BalanceOut,
    CreditLineRequest,
    CreditOut,
    CreditRequest,
    to_pusd,
    to_usd,
)
from persistence import accounts

__all__ = ["OPERATIONS"]

ADMINS = frozenset({"admin"})


async def _client(call: Call) -> object:
    row = await accounts.client(call.state.pool, call.path["client_id"])
    if row is None:
        raise NotFound("no such client", field="client_id")
    return row


def _amount(body: CreditRequest) -> int:
    if (body.amount_usd is None) == (body.amount_pusd is None):
        raise ValidationFailed("give amount_usd or amount_pusd (one of them)", field="amount_usd")
    amount = body.amount_pusd if body.amount_pusd is not None else to_pusd(body.amount_usd or 0)
    if amount < 1:
        raise ValidationFailed("below one pico-USD", field="amount_usd")
    return amount


async def credit(call: Call) -> CreditOut:
    body: CreditRequest = call.body
    row = await _client(call)
    client_id = str(row["id"])  # type: ignore[index]
    result = await call.state.market.credit(
        client_id,
        _amount(body),
        key=f"admin:{body.key}",
        rail="operator",
        reason=body.reason,
        reference=f"admin:{call.user.user_id}",
        now_ms=call.now_ms(),
    )
    return CreditOut(
        client_id=client_id,
        applied=result.applied,
        balance_usd=to_usd(result.balance_pusd),
        balance_pusd=result.balance_pusd,
        event_id=result.event_id,
    )


async def clawback(call: Call) -> CreditOut:
    body: CreditRequest = call.body
    row = await _client(call)
    client_id = str(row["id"])  # type: ignore[index]
    market, now_ms = call.state.market, call.now_ms()
    amount = _amount(body)
    # The renter's idle money in the regions comes back first (its holds stay held).
    await market.gather(client_id, now_ms)
    result = await market.debit(
        client_id,
        amount,
        key=f"admin:{body.key}",
        rail="operator",
        reason=body.reason,
        reference=f"admin:{call.user.user_id}",
        now_ms=now_ms,
        allow_negative=body.allow_negative,
    )
    return CreditOut(
        client_id=client_id,
        applied=result.applied,
        balance_usd=to_usd(result.balance_pusd),
        balance_pusd=result.balance_pusd,
        event_id=result.event_id,
    )


async def credit_line(call: Call) -> BalanceOut:
    body: CreditLineRequest = call.body
    if (body.credit_line_usd is None) == (body.credit_line_pusd is None):
        raise ValidationFailed(
            "give credit_line_usd or credit_line_pusd (one of them)", field="credit_line_usd"
        )
    amount = (
        body.credit_line_pusd
        if body.credit_line_pusd is not None
        else to_pusd(body.credit_line_usd or 0.0)
    )
    row = await accounts.set_credit_line(call.state.pool, call.path["client_id"], amount)
    if row is None:
        raise NotFound("no such client", field="client_id")
    return await balance_of(call.state.market, row, call.now_ms())


async def client_balance(call: Call) -> BalanceOut:
    row = await accounts.client(call.state.pool, call.path["client_id"])
    if row is None or (str(row["user_id"]) != call.user.user_id and not call.user.is_admin):
        raise NotFound("no such client", field="client_id")
    return await balance_of(call.state.market, row, call.now_ms())


async def my_balances(call: Call) -> BalanceList:
    pool, now_ms = call.state.pool, call.now_ms()
    out = []
    for client_id in await client_ids_of(pool, call.user):
        row = await owned_client(pool, call.user, client_id)
        out.append(await balance_of(call.state.market, row, now_ms))
    return BalanceList(balances=out)


OPERATIONS: list[Operation] = [
    Operation(
        "GET",
        "/api/clients/{client_id}/balance",
        client_balance,
        name="client_balance",
        summary="A renter's balance: available (funding and regions together), held, credit "
        "line, this month's spend against the budget",
        tag="money",
        response=BalanceOut,
        errors=(404,),
    ),
    Operation(
        "GET",
        "/api/accounts/me/balance",
        my_balances,
        name="my_balances",
        summary="The balance of each of the caller's renter profiles",
        tag="money",
        response=BalanceList,
    ),
    Operation(
        "POST",
        "/api/admin/accounts/{client_id}/credit",
        credit,
        name="admin_credit",
        summary="Operators: credit a renter's balance (ledgered with a reason, once per key)",
        tag="money",
        body=CreditRequest,
        response=CreditOut,
        roles=ADMINS,
        idempotent=True,
        errors=(404,),
    ),
    Operation(
        "POST",
        "/api/admin/accounts/{client_id}/clawback",
        clawback,
        name="admin_clawback",
        summary="Operators: take credit back from a renter's balance (ledgered, once per key)",
        tag="money",
        body=CreditRequest,
        response=CreditOut,
        roles=ADMINS,
        idempotent=True,
        errors=(402, 404),
    ),
    Operation(
        "PUT",
        "/api/admin/accounts/{client_id}/credit-line",
        credit_line,
        name="admin_credit_line",
        summary="Operators: grant (or withdraw) a renter's postpaid credit line",
        tag="money",
        body=CreditLineRequest,
        response=BalanceOut,
        roles=ADMINS,
        errors=(404,),
    ),
]
