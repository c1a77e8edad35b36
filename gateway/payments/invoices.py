"""Invoices (`GET /api/payments/invoice/{client_id}`, the spec's route): one client's calendar
month (UTC) as JSON, or as a plain HTML page a person can print and file.

The month's contracts (those closed in it: usage, egress, cost) come from the journal's
history; payments, refunds, charges, fees and balances from the ledger, so that
`closing_balance = opening_balance + payments - refunds - charges + adjustments` exactly (in
pico-USD). A contract still open at the month's end is on the invoice of the month it closes in.
The client's user and admins only; anyone else gets 404, as for an unknown client. The HTML is
one self-contained page: every value escaped, no script, no external asset, its one style
sheet allowed by hash in its Content-Security-Policy.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
from typing import Annotated, Literal

import asyncpg
from msgspec import Meta, Struct
from starlette.responses import Response

from engine.errors import NotFound
from gateway.operations import Call, Operation, route
from gateway.protocol import whole
from gateway.schemas import to_usd
from persistence import accounts
from persistence import invoices as q

__all__ = ["OPERATIONS", "Invoice", "InvoiceQuery", "render_html", "routes"]

Period = Annotated[
    str,
    Meta(
        pattern=whole(r"(19[7-9][0-9]|[2-9][0-9]{3})-(0[1-9]|1[0-2])"),
        description="A calendar month, YYYY-MM (UTC); default the current one.",
        examples=["2026-05"],
    ),
]


class InvoiceQuery(Struct, forbid_unknown_fields=True, kw_only=True):
    period: Period | None = None
    format: Literal["json", "html"] | None = None
    """`html` for the printable page (as does `Accept: text/html`); default JSON."""


class InvoiceContract(Struct, kw_only=True):
    contract_id: str
    node_id: str
    region: str
    status: str
    start: dt.datetime
    completed: dt.datetime
    ram_gb: int
    vram_gb: int
    used_sec: int
    price_per_gb_sec: float
    price_pusd: int
    egress_gb: float
    usage_usd: float
    usage_pusd: int
    egress_usd: float
    egress_pusd: int
    total_cost_usd: float
    total_cost_pusd: int


class InvoiceLine(Struct, kw_only=True):
    """One ledger movement of the client's money: `amount` is its change (+ in, - out)."""

    at: dt.datetime
    kind: str
    """payment, refund, charge or adjustment."""
    description: str
    rail: str | None
    reference: str | None
    contract_id: str | None
    amount_usd: float
    amount_pusd: int
    fee_usd: float
    fee_pusd: int


class Invoice(Struct, kw_only=True):
    invoice_number: str
    client_id: str
    org_name: str
    period: str
    period_start: dt.datetime
    period_end: dt.datetime
    issued_at: dt.datetime
    currency: str
    contracts: list[InvoiceContract]
    usage_usd: float
    usage_pusd: int
    egress_usd: float
    egress_pusd: int
    contracts_total_usd: float
    contracts_total_pusd: int
    lines: list[InvoiceLine]
    opening_balance_usd: float
    opening_balance_pusd: int
    payments_usd: float
    payments_pusd: int
    refunds_usd: float
    refunds_pusd: int
    charges_usd: float
    charges_pusd: int
    fees_usd: float
    fees_pusd: int
    """The platform's fee within the charges (informational: it is part of each charge)."""
    adjustments_usd: float
    adjustments_pusd: int
    closing_balance_usd: float
    closing_balance_pusd: int


def month_bounds(period: str | None, now: dt.datetime) -> tuple[str, dt.datetime, dt.datetime]:
    """(YYYY-MM, its first instant, the next month's first instant), UTC."""
    if period is None:
        start = dt.datetime(now.year, now.month, 1, tzinfo=dt.UTC)
    else:
        start = dt.datetime(int(period[:4]), int(period[5:7]), 1, tzinfo=dt.UTC)
    end = (start + dt.timedelta(days=32)).replace(day=1)
    return f"{start:%Y-%m}", start, end


def _kind(cause: str) -> str:
    if cause == "credit":
        return "payment"
    if cause == "debit":
        return "refund"
    if cause == "settle":
        return "charge"
    return "adjustment"


def _description(row: asyncpg.Record, kind: str) -> str:
    rail = row["rail"]
    if kind == "payment":
        return {"stripe": "Card payment", "operator": "Credit granted"}.get(
            rail or "", f"Payment ({rail})" if rail else "Payment"
        )
    if kind == "refund":
        return {"stripe": "Card refund", "operator": "Credit withdrawn"}.get(
            rail or "", f"Refund ({rail})" if rail else "Refund"
        )
    if kind == "charge":
        return "Contract settled"
    return (row["reason"] or row["cause"]).capitalize()


async def build_invoice(
    pool: asyncpg.Pool, client: asyncpg.Record, period: str | None, now: dt.datetime
) -> Invoice:
    """The invoice of `client` (its row) for `period` (None: the month of `now`)."""
    name, start, end = month_bounds(period, now)
    client_id = str(client["id"])
    contracts: list[InvoiceContract] = []
    usage = egress = 0
    for row in await q.client_contracts(pool, client_id, start, end):
        egress_pusd = row["egress_mgb"] * row["egress_price_pusd"] // 1000
        total = int(row["total_cost_pusd"])
        contracts.append(
            InvoiceContract(
                contract_id=row["id"].hex,
                node_id=row["node_id"].hex,
                region=row["region"],
                status=row["status"],
                start=row["start_time"],
                completed=row["completed_at"],
                ram_gb=row["ram_gb"],
                vram_gb=row["vram_gb"],
                used_sec=row["used_sec"],
                price_per_gb_sec=to_usd(row["price_pusd"]),
                price_pusd=row["price_pusd"],
                egress_gb=row["egress_mgb"] / 1000,
                usage_usd=to_usd(total - egress_pusd),
                usage_pusd=total - egress_pusd,
                egress_usd=to_usd(egress_pusd),
                egress_pusd=egress_pusd,
                total_cost_usd=to_usd(total),
                total_cost_pusd=total,
            )
        )
        usage += total - egress_pusd
        egress += egress_pusd
    lines: list[InvoiceLine] = []
    sums = {"payment": 0, "refund": 0, "charge": 0, "adjustment": 0}
    fees = 0
    for row in await q.client_movements(pool, client_id, start, end):
        amount = int(row["amount_pusd"])
        kind = _kind(row["cause"])
        fee = int(row["fee_pusd"]) if kind == "charge" else 0
        sums[kind] += amount
        fees += fee
        lines.append(
            InvoiceLine(
                at=row["ts"],
                kind=kind,
                description=_description(row, kind),
                rail=row["rail"],
                reference=row["reference"],
                contract_id=row["contract_id"],
                amount_usd=to_usd(amount),
                amount_pusd=amount,
                fee_usd=to_usd(fee),
                fee_pusd=fee,
            )
        )
    opening = await q.client_balance(pool, client_id, start)
    closing = await q.client_balance(pool, client_id, end)
    return Invoice(
        invoice_number=f"MNEMO-{name.replace('-', '')}-{client['id'].hex[:8].upper()}",
        client_id=client_id,
        org_name=client["org_name"],
        period=name,
        period_start=start,
        period_end=end,
        issued_at=now,
        currency="USD",
        contracts=contracts,
        usage_usd=to_usd(usage),
        usage_pusd=usage,
        egress_usd=to_usd(egress),
        egress_pusd=egress,
        contracts_total_usd=to_usd(usage + egress),
        contracts_total_pusd=usage + egress,
        lines=lines,
        opening_balance_usd=to_usd(opening),
        opening_balance_pusd=opening,
        payments_usd=to_usd(sums["payment"]),
        payments_pusd=sums["payment"],
        refunds_usd=to_usd(-sums["refund"]),
        refunds_pusd=-sums["refund"],
        charges_usd=to_usd(-sums["charge"]),
        charges_pusd=-sums["charge"],
        fees_usd=to_usd(fees),
        fees_pusd=fees,
        adjustments_usd=to_usd(sums["adjustment"]),
        adjustments_pusd=sums["adjustment"],
        closing_balance_usd=to_usd(closing),
        closing_balance_pusd=closing,
    )


# -- HTML ----------------------------------------------------------------------------------------

_STYLE = (
    "body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:60em;color:#111}"
    "h1{font-size:1.6em;margin:0}table{border-collapse:collapse;width:100%;margin:1em 0}"
    "th,td{border-bottom:1px solid #ccc;padding:.3em .5em;text-align:left;vertical-align:top}"
    "td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}"
    "tfoot td{font-weight:bold;border-top:2px solid #111}.muted{color:#555}"
    "@media print{body{margin:0}}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()
HTML_CSP = (
    f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
"""The page's Content-Security-Policy: nothing but its own style sheet."""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def money(amount_pusd: int) -> str:
    """Pico-USD as USD text: cents, or more digits where the amount has them (exact)."""
    sign = "-" if amount_pusd < 0 else ""
    whole_usd, frac = divmod(abs(amount_pusd), 10**12)
    digits = f"{frac:012d}".rstrip("0")
    digits = digits + "0" * (2 - len(digits)) if len(digits) < 2 else digits
    return f"{sign}{whole_usd:,}.{digits}"


def _when(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def render_html(inv: Invoice) -> str:
    """The invoice as one printable HTML page (every value escaped)."""
    rows = []
    for c in inv.contracts:
        rows.append(
            "<tr>"
            f"<td>{_e(c.contract_id[:12])}</td><td>{_e(c.region)}</td><td>{_e(c.status)}</td>"
            f"<td>{_e(_when(c.start))}<br>{_e(_when(c.completed))}</td>"
            f"<td class=n>{c.ram_gb + c.vram_gb:,} GB x {c.used_sec:,} s</td>"
            f"<td class=n>{_e(money(c.price_pusd))}</td>"
            f"<td class=n>{_e(money(c.usage_pusd))}</td>"
            f"<td class=n>{c.egress_gb:,.3f} GB<br>{_e(money(c.egress_pusd))}</td>"
            f"<td class=n>{_e(money(c.total_cost_pusd))}</td></tr>"
        )
    contracts = (
        "".join(rows)
        or "<tr><td colspan=9 class=muted>No contract closed in this period.</td></tr>"
    )
    lines = (
        "".join(
            "<tr>"
            f"<td>{_e(_when(line.at))}</td><td>{_e(line.description)}</td>"
            f"<td>{_e(line.reference or line.contract_id or '')}</td>"
            f"<td class=n>{_e(money(line.fee_pusd)) if line.fee_pusd else ''}</td>"
            f"<td class=n>{_e(money(line.amount_pusd))}</td></tr>"
            for line in inv.lines
        )
        or "<tr><td colspan=5 class=muted>No payment or charge in this period.</td></tr>"
    )
    summary = [
        ("Opening balance", inv.opening_balance_pusd),
        ("Payments", inv.payments_pusd),
        ("Refunds", -inv.refunds_pusd),
        ("Charges (contracts settled)", -inv.charges_pusd),
    ]
    if inv.adjustments_pusd:
        summary.append(("Adjustments", inv.adjustments_pusd))
    summary_rows = "".join(
        f"<tr><td>{_e(label)}</td><td class=n>{_e(money(value))}</td></tr>"
        for label, value in summary
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>Invoice {_e(inv.invoice_number)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>Invoice {_e(inv.invoice_number)}</h1>"
        f"<p>Mnemo exchange &middot; billed to <b>{_e(inv.org_name)}</b> "
        f"(client {_e(inv.client_id)})<br>Period {_e(inv.period)}: "
        f"{_e(_when(inv.period_start))} to {_e(_when(inv.period_end))} &middot; "
        f"issued {_e(_when(inv.issued_at))} &middot; amounts in {_e(inv.currency)}</p>"
        "<h2>Contracts</h2><table><thead><tr><th>Contract</th><th>Region</th><th>Status</th>"
        "<th>Started / closed</th><th class=n>Used</th><th class=n>Price per GB-s</th>"
        "<th class=n>Usage</th><th class=n>Egress</th><th class=n>Total</th></tr></thead>"
        f"<tbody>{contracts}</tbody><tfoot><tr><td colspan=6>Total</td>"
        f"<td class=n>{_e(money(inv.usage_pusd))}</td><td class=n>{_e(money(inv.egress_pusd))}"
        f"</td><td class=n>{_e(money(inv.contracts_total_pusd))}</td></tr></tfoot></table>"
        "<h2>Account</h2><table><thead><tr><th>Date</th><th>Item</th><th>Reference</th>"
        "<th class=n>Platform fee incl.</th><th class=n>Amount</th></tr></thead>"
        f"<tbody>{lines}</tbody></table>"
        f"<table><tbody>{summary_rows}</tbody><tfoot><tr><td>Closing balance</td>"
        f"<td class=n>{_e(money(inv.closing_balance_pusd))}</td></tr></tfoot></table>"
        f"<p class=muted>Platform fees included in the charges: {_e(money(inv.fees_pusd))}. "
        "Amounts are exact to 1e-12 USD (the exchange's unit); cards are charged in cents.</p>"
        "</body></html>"
    )


# -- the route -----------------------------------------------------------------------------------


async def invoice(call: Call) -> Invoice | Response:
    query: InvoiceQuery = call.query
    pool = call.state.pool
    client = await accounts.client(pool, call.path["client_id"])
    if client is None or (str(client["user_id"]) != call.user.user_id and not call.user.is_admin):
        raise NotFound("no such client", field="client_id")
    inv = await build_invoice(pool, client, query.period, dt.datetime.now(dt.UTC))
    wants_html = query.format == "html" or (
        query.format is None and "text/html" in call.request.headers.get("accept", "")
    )
    if wants_html:
        return Response(
            render_html(inv),
            media_type="text/html; charset=utf-8",
            headers={"Content-Security-Policy": HTML_CSP, "X-Content-Type-Options": "nosniff"},
        )
    return inv


OPERATIONS: list[Operation] = [
    Operation(
        "GET",
        "/api/payments/invoice/{client_id}",
        invoice,
        name="client_invoice",
        summary="A client's invoice for a month: contracts, egress, fees, payments, refunds, "
        "balance",
        tag="payments",
        query=InvoiceQuery,
        response=Invoice,
        other_media=("text/html",),
        description="JSON by default; `?format=html` (or `Accept: text/html`) answers a "
        "printable page. The client's user and admins only (404 otherwise).",
    ),
]

routes = [route(op) for op in OPERATIONS]
