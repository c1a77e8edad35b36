"""A loopback fake of the parts of Stripe that localstripe lacks: Connect, for the payout
tests, and Checkout, for the card top-up on the web app.

    python -m tests.payments.connect_fake PORT [LOCALSTRIPE_URL]

Serves what Mnemo calls, with Stripe's object shapes, form-encoded requests, error bodies and
idempotency (a key replays the first response; reused with other parameters it is a 400
`idempotency_error`, as Stripe answers):
- `POST /v1/accounts` (Express), `GET /v1/accounts/{id}`;
- `POST /v1/account_links` (its `url` is this server's `/connect/onboarding/{id}`: opening it
  completes onboarding, as Stripe's hosted form would, and redirects to the link's `return_url`);
- `POST /v1/transfers` (the destination must have its `transfers` capability active), `GET
  /v1/transfers/{id}`, `GET /v1/transfers?transfer_group=&destination=`.
- `POST /v1/checkout/sessions` (mode `payment`, one line item with `price_data`),
  `GET /v1/checkout/sessions/{id}`, `POST /v1/checkout/sessions/{id}/expire`. The session's
  `url` is this server's `/checkout/pay/{id}`, the hosted payment page: a plain form taking a
  card number (Stripe's test numbers) that, on submit, makes and confirms the PaymentIntent on
  localstripe (`LOCALSTRIPE_URL`, with the session's `payment_intent_data[metadata]` and the
  secret key the session was created with), so that localstripe's own webhooks follow; paid, it
  completes the session and sends the payer to `success_url` (`{CHECKOUT_SESSION_ID}` filled
  in); declined, it shows the decline, as Stripe's page does. Its cancel link goes to
  `cancel_url`.
Not `/v1/payouts`: Mnemo never calls it (an Express account's balance goes to its bank on
Stripe's own payout schedule).
Test controls (not Stripe's): `GET /_test/calls` lists every API request in order (method, path,
idempotency key, and whether it created an object); `POST /_test/faults` with
`{"hang": "/v1/transfers", "times": 1}` makes the next such POSTs (`times` of them; default
all) do their work, record it and then never answer (a response lost on the way back);
`{"hang": null}` ends that. `{"refuse": "/v1/transfers"}` makes such POSTs fail as Stripe
refuses one (400, kept for their idempotency key) until `{"refuse": null}`.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import secrets
import sys
import time
from typing import Any
from urllib.parse import parse_qsl

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route


def _id(prefix: str) -> str:
    return prefix + secrets.token_hex(8)


def _nest(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding (`metadata[k]=v`, `capabilities[transfers][requested]=true`)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        parts = key.replace("]", "").split("[")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def _error(
    status: int, message: str, *, kind: str = "invalid_request_error", **extra: Any
) -> Response:
    return JSONResponse({"error": {"type": kind, "message": message, **extra}}, status_code=status)


class ConnectFake:
    def __init__(self, localstripe: str | None = None) -> None:
        self.localstripe = localstripe
        self.sessions: dict[str, dict[str, Any]] = {}
        self.session_keys: dict[str, str] = {}
        """Checkout Session id -> the secret key it was created with (to pay on localstripe)."""
        self.accounts: dict[str, dict[str, Any]] = {}
        self.links: dict[str, str] = {}
        self.transfers: dict[str, dict[str, Any]] = {}
        self.idempotent: dict[tuple[str, str], tuple[str, int, dict[str, Any]]] = {}
        self.calls: list[dict[str, Any]] = []
        self.hang: str | None = None
        self.hang_times: int | None = None
        self.refuse: str | None = None

    # -- the API -----------------------------------------------------------------------------

    async def api(self, request: Request) -> Response:
        body = _nest(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        key = request.headers.get("idempotency-key")
        account = request.headers.get("stripe-account")
        call = {
            "method": request.method,
            "path": request.url.path,
            "idempotency_key": key,
            "stripe_account": account,
            "params": body or dict(request.query_params),
            "replayed": False,
        }
        self.calls.append(call)
        fingerprint = hashlib.sha256(
            json.dumps([request.url.path, account, body], sort_keys=True).encode()
        ).hexdigest()
        if request.method == "POST" and key is not None:
            seen = self.idempotent.get((account or "", key))
            if seen is not None:
                if seen[0] != fingerprint:
                    return _error(
                        400,
                        "Keys for idempotent requests can only be used with the same parameters "
                        "they were first used with.",
                        kind="idempotency_error",
                    )
                call["replayed"] = True
                return JSONResponse(
                    seen[2], status_code=seen[1], headers={"Idempotent-Replayed": "true"}
                )
        if self.refuse == request.url.path and request.method == "POST":
            response = _error(
                400, "The transfer was refused (a test fault).", code="transfer_refused"
            )
        else:
            response = self._dispatch(request, body)
        if request.method == "POST" and key is not None and response.status_code < 500:
            self.idempotent[(account or "", key)] = (
                fingerprint,
                response.status_code,
                _json_of(response),
            )
        if self.hang is not None and request.url.path == self.hang and request.method == "POST":
            if self.hang_times is not None:
                self.hang_times -= 1
                if self.hang_times <= 0:
                    self.hang = None
            await asyncio.Event().wait()  # the work is done and kept: the answer never leaves
        return response

    def _dispatch(self, request: Request, body: dict[str, Any]) -> Response:
        path = request.url.path.removeprefix("/v1/").split("/")
        method = request.method
        if path == ["accounts"] and method == "POST":
            return self._create_account(body)
        if path[0] == "accounts" and len(path) == 2 and method == "GET":
            found = self.accounts.get(path[1])
            return JSONResponse(found) if found else _missing("account", path[1])
        if path == ["account_links"] and method == "POST":
            return self._create_link(request, body)
        if path == ["transfers"] and method == "POST":
            return self._create_transfer(body)
        if path == ["transfers"] and method == "GET":
            return self._list_transfers(dict(request.query_params))
        if path[0] == "transfers" and len(path) == 2 and method == "GET":
            found = self.transfers.get(path[1])
            return JSONResponse(found) if found else _missing("transfer", path[1])
        if path == ["checkout", "sessions"] and method == "POST":
            return self._create_session(request, body)
        if path[:2] == ["checkout", "sessions"] and len(path) in (3, 4):
            found = self.sessions.get(path[2])
            if found is None:
                return _missing("checkout.session", path[2])
            if len(path) == 3 and method == "GET":
                return JSONResponse(found)
            if path[3:] == ["expire"] and method == "POST":
                if found["status"] != "open":
                    return _error(400, f"Only open sessions can be expired ({found['status']}).")
                found.update(status="expired", url=None)
                return JSONResponse(found)
        return _error(404, f"Unrecognized request URL ({method}: {request.url.path}).")

    def _create_account(self, body: dict[str, Any]) -> Response:
        if body.get("type") != "express":
            return _error(400, "Only Express accounts are faked.", param="type")
        acct = {
            "id": _id("acct_"),
            "object": "account",
            "type": "express",
            "email": body.get("email"),
            "country": body.get("country", "US"),
            "default_currency": "usd",
            "charges_enabled": False,
            "payouts_enabled": False,
            "details_submitted": False,
            "capabilities": {"transfers": "inactive"},
            "metadata": body.get("metadata", {}),
            "created": int(time.time()),
            "livemode": False,
        }
        self.accounts[acct["id"]] = acct
        self.calls[-1]["created"] = acct["id"]
        return JSONResponse(acct)

    def _create_link(self, request: Request, body: dict[str, Any]) -> Response:
        acct = body.get("account")
        if acct not in self.accounts:
            return _missing("account", str(acct), param="account")
        for name in ("refresh_url", "return_url"):
            if not str(body.get(name, "")).startswith(("http://", "https://")):
                return _error(400, f"Not a valid URL: {name}", param=name)
        if body.get("type") not in ("account_onboarding", "account_update"):
            return _error(400, "Invalid type", param="type")
        self.links[acct] = body["return_url"]
        now = int(time.time())
        return JSONResponse(
            {
                "object": "account_link",
                "created": now,
                "expires_at": now + 300,
                "url": f"{request.base_url}connect/onboarding/{acct}",
            }
        )

    def _create_transfer(self, body: dict[str, Any]) -> Response:
        try:
            amount = int(body.get("amount", ""))
        except ValueError:
            return _error(400, "Invalid integer: amount", param="amount")
        if amount < 1:
            return _error(400, "Amount must be at least 1 cent", param="amount")
        if body.get("currency") != "usd":
            return _error(400, "Invalid currency", param="currency")
        dest = self.accounts.get(str(body.get("destination")))
        if dest is None:
            return _missing("account", str(body.get("destination")), param="destination")
        if dest["capabilities"]["transfers"] != "active":
            return _error(
                400,
                "Your destination account needs to have at least one of the following "
                "capabilities enabled: transfers, crypto_transfers, legacy_payments",
                param="destination",
                code="insufficient_capabilities_for_transfer",
            )
        transfer = {
            "id": _id("tr_"),
            "object": "transfer",
            "amount": amount,
            "amount_reversed": 0,
            "currency": "usd",
            "destination": dest["id"],
            "destination_payment": _id("py_"),
            "balance_transaction": _id("txn_"),
            "transfer_group": body.get("transfer_group"),
            "description": body.get("description"),
            "metadata": body.get("metadata", {}),
            "created": int(time.time()),
            "reversed": False,
            "livemode": False,
        }
        self.transfers[transfer["id"]] = transfer
        self.calls[-1]["created"] = transfer["id"]
        return JSONResponse(transfer)

    def _create_session(self, request: Request, body: dict[str, Any]) -> Response:
        if body.get("mode") != "payment":
            return _error(400, "Only mode=payment is faked.", param="mode")
        items = list((body.get("line_items") or {}).values())
        if len(items) != 1 or "price_data" not in items[0]:
            return _error(400, "Give one line item with price_data.", param="line_items")
        price = items[0]["price_data"]
        try:
            amount = int(price.get("unit_amount", "")) * int(items[0].get("quantity", "1"))
        except ValueError:
            return _error(400, "Invalid integer: unit_amount", param="line_items")
        if amount < 50:
            return _error(400, "The amount must be at least 50 cents.", param="line_items")
        for name in ("success_url", "cancel_url"):
            if not str(body.get(name, "")).startswith(("http://", "https://")):
                return _error(400, f"Not a valid URL: {name}", param=name)
        session_id = _id("cs_test_")
        session = {
            "id": session_id,
            "object": "checkout.session",
            "mode": "payment",
            "status": "open",
            "payment_status": "unpaid",
            "amount_total": amount,
            "currency": price.get("currency", "usd"),
            "client_reference_id": body.get("client_reference_id"),
            "metadata": body.get("metadata", {}),
            "payment_intent": None,
            "success_url": body["success_url"],
            "cancel_url": body["cancel_url"],
            "url": f"{request.base_url}checkout/pay/{session_id}",
            "created": int(time.time()),
            "expires_at": int(time.time()) + 86_400,
            "livemode": False,
            "payment_intent_data": body.get("payment_intent_data", {}),
        }
        self.sessions[session_id] = session
        self.session_keys[session_id] = request.headers.get("authorization", "")
        self.calls[-1]["created"] = session_id
        return JSONResponse({k: v for k, v in session.items() if k != "payment_intent_data"})

    def _list_transfers(self, query: dict[str, str]) -> Response:
        found = [
            t
            for t in self.transfers.values()
            if query.get("transfer_group") in (None, t["transfer_group"])
            and query.get("destination") in (None, t["destination"])
        ]
        return JSONResponse(_list("/v1/transfers", found))

    # -- what a provider's browser and the tests do ---------------------------------------------

    async def onboarding(self, request: Request) -> Response:
        acct = self.accounts.get(request.path_params["account"])
        if acct is None:
            return Response("no such account", status_code=404)
        acct.update(charges_enabled=True, payouts_enabled=True, details_submitted=True)
        acct["capabilities"] = {"transfers": "active"}
        return RedirectResponse(self.links[acct["id"]], status_code=303)

    async def pay_page(self, request: Request) -> Response:
        """Stripe's hosted payment page, as far as a test needs it: the amount, a card number
        field, Pay and a way back."""
        session = self.sessions.get(request.path_params["session"])
        if session is None or session["status"] != "open":
            return HTMLResponse("<p>This Checkout Session is no longer available.</p>", 404)
        error = ""
        if request.method == "POST":
            form = dict(parse_qsl((await request.body()).decode()))
            error = await self._pay(session, form.get("card_number", "").replace(" ", ""))
            if not error:
                target = session["success_url"].replace("{CHECKOUT_SESSION_ID}", session["id"])
                return RedirectResponse(target, status_code=303)
        amount = session["amount_total"] / 100
        return HTMLResponse(
            "<!doctype html><title>Pay (Checkout fake)</title>"
            f"<h1>Pay {amount:.2f} {session['currency'].upper()}</h1>"
            + (f'<p role="alert" id="decline">{html.escape(error)}</p>' if error else "")
            + '<form method="post"><label>Card number <input name="card_number" '
            'autocomplete="cc-number" required></label> <button type="submit">Pay</button></form>'
            f'<p><a href="{html.escape(session["cancel_url"])}">Back</a></p>',
            400 if error else 200,
        )

    async def _pay(self, session: dict[str, Any], number: str) -> str:
        """Make and confirm the session's PaymentIntent on localstripe; '' when paid, else the
        decline's message."""
        assert self.localstripe is not None, "no LOCALSTRIPE_URL given to pay with"
        auth = {"Authorization": self.session_keys[session["id"]]}
        metadata = (session["payment_intent_data"] or {}).get("metadata", {})
        async with httpx.AsyncClient(base_url=self.localstripe, headers=auth) as http:
            pm = await http.post(
                "/v1/payment_methods",
                data={
                    "type": "card",
                    "card[number]": number,
                    "card[exp_month]": "12",
                    "card[exp_year]": str(time.gmtime().tm_year + 2),
                    "card[cvc]": "123",
                },
            )
            if pm.status_code != 200:
                return str(pm.json()["error"]["message"])
            pi = await http.post(
                "/v1/payment_intents",
                data={
                    "amount": str(session["amount_total"]),
                    "currency": session["currency"],
                    "payment_method": pm.json()["id"],
                    "payment_method_types[]": "card",
                    "confirm": "true",
                    **{f"metadata[{k}]": v for k, v in metadata.items()},
                },
            )
        body = pi.json()
        if pi.status_code != 200 or body.get("status") != "succeeded":
            error = body.get("error") or body.get("last_payment_error") or {}
            return str(error.get("message") or "Your card was declined.")
        session.update(
            status="complete", payment_status="paid", payment_intent=body["id"], url=None
        )
        return ""

    async def get_calls(self, request: Request) -> Response:
        return JSONResponse(self.calls)

    async def set_faults(self, request: Request) -> Response:
        faults = await request.json()
        self.hang, self.hang_times = faults.get("hang"), faults.get("times")
        self.refuse = faults.get("refuse")
        return JSONResponse(faults)


def _list(url: str, data: list[dict[str, Any]]) -> dict[str, Any]:
    return {"object": "list", "url": url, "has_more": False, "data": data}


def _missing(kind: str, ident: str, **extra: Any) -> Response:
    return _error(404, f"No such {kind}: '{ident}'", code="resource_missing", **extra)


def _json_of(response: Response) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(bytes(response.body))
    return data


def make_app(localstripe: str | None = None) -> Starlette:
    fake = ConnectFake(localstripe)
    return Starlette(
        routes=[
            Route("/v1/{rest:path}", fake.api, methods=["GET", "POST"]),
            Route("/connect/onboarding/{account}", fake.onboarding, methods=["GET"]),
            Route("/checkout/pay/{session}", fake.pay_page, methods=["GET", "POST"]),
            # a browser on the hosted page asks for its icon (no content, no 404 in the console)
            Route("/favicon.ico", lambda _: Response(status_code=204), methods=["GET"]),
            Route("/_test/calls", fake.get_calls, methods=["GET"]),
            Route("/_test/faults", fake.set_faults, methods=["POST"]),
        ]
    )


if __name__ == "__main__":
    uvicorn.run(
        make_app(sys.argv[2] if len(sys.argv) > 2 else None),
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_level="warning",
    )
