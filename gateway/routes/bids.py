"""Limit bids for bots, and the order book.

A bid rests in its region's book (price-time priority) until the engine crosses it with an eligible
ask, it is cancelled, or it expires. A fill is a contract at the ask's price; the bid's price is a
cap. A bid rests only if the renter's balance covers its hold, size x duration x cap (402
otherwise, see `gateway.money`); a fill holds the contract's cost out of it and releases the
rest. Who may do what: renters and admins place bids for their own clients; a bid is visible to,
and cancellable by, its owner (and admins); anyone else gets 404. The book (quote and depth) is
public to any authenticated caller.
"""

from __future__ import annotations

import datetime as dt

import asyncpg

from engine import core
from engine.errors import NotFound
from engine.keys import mint_id
from engine.types import Bid
from gateway.errors import ValidationFailed, named_as
from gateway.money import paying
from gateway.operations import Call, Link, Operation
from gateway.protocol import BidOut, BookOut
from gateway.ratelimit import WRITES
from gateway.routes.accounts import RENTERS, client_ids_of, owned_client
from gateway.schemas import (
    BidCreateRequest,
    BidList,
    BidListQuery,
    bid_out,
    book_out,
    to_pusd,
    to_usd,
)
from persistence import history

__all__ = ["OPERATIONS"]


async def _own_bid(call: Call) -> Bid:
    bid = await call.state.market.get_bid(call.path["bid_id"])
    if bid is None or (bid.user_id != call.user.user_id and not call.user.is_admin):
        raise NotFound("no such bid", field="bid_id")
    return bid


async def place(call: Call) -> BidOut:
    body: BidCreateRequest = call.body
    total = body.ram_gb + body.vram_gb
    if total == 0:
        raise ValidationFailed("ask for some memory: ram_gb + vram_gb must be > 0", field="ram_gb")
    if body.min_fill_gb > total:
        raise ValidationFailed("min_fill_gb exceeds ram_gb + vram_gb", field="min_fill_gb")
    if (body.client_lat is None) != (body.client_lng is None):
        raise ValidationFailed("give client_lat and client_lng together", field="client_lat")
    cap = to_pusd(body.max_price_per_gb_sec)
    if cap < 1:
        raise ValidationFailed(
            "price cap below 1e-12 USD per GB-second", field="max_price_per_gb_sec"
        )
    client = await owned_client(call.state.pool, call.user, body.client_id)
    lat, lng = body.client_lat, body.client_lng
    if lat is None and client["latitude"] is not None and client["longitude"] is not None:
        lat, lng = float(client["latitude"]), float(client["longitude"])
    if body.max_distance_km is not None and lat is None:
        raise ValidationFailed(
            "max_distance_km needs a location (client_lat/client_lng or the client profile's)",
            field="max_distance_km",
        )
    now_ms = call.now_ms()
    bid = Bid(
        bid_id=mint_id(body.region),
        region=body.region,
        client_id=str(client["id"]),
        user_id=call.user.user_id,
        ram_gb=body.ram_gb,
        vram_gb=body.vram_gb,
        duration_s=body.duration_sec,
        max_price_pusd=cap,
        lat=lat,
        lng=lng,
        max_distance_km=body.max_distance_km,
        min_uptime_score=body.min_uptime_score,
        prefer_local=body.prefer_local,
        node_type=body.node_type,
        allow_split=body.allow_split,
        min_fill_gb=body.min_fill_gb,
        created_ms=now_ms,
        expires_ms=now_ms + body.expires_in_sec * 1000 if body.expires_in_sec else 0,
    )
    market = call.state.market
    need = core.hold_pusd(bid.ram_gb + bid.vram_gb, bid.duration_s, cap)
    with named_as(duration_s="duration_sec", max_price_pusd="max_price_per_gb_sec"):
        core.new_bid(bid, now_ms)  # refused as malformed before any money moves
        placed = await paying(
            market,
            client,
            bid.region,
            need,
            now_ms,
            lambda budgeted: market.place_bid(bid, now_ms, budgeted=budgeted),
        )
    return bid_out(placed)


async def list_bids(call: Call) -> BidList:
    """From Postgres (the journal's `bids` table, indexed by client): any status, newest first.
    Rows trail the live book by the journal's lag; `GET /api/bids/{id}` is live."""
    q: BidListQuery = call.query
    who = call.user
    pool = call.state.pool
    client_id: str | None = None
    client_ids: list[str] | None = None
    if q.client_id is not None:
        client_id = str((await owned_client(pool, who, q.client_id))["id"])
    elif not who.is_admin:
        client_ids = await client_ids_of(pool, who)
    total, rows = await history.bids_page(
        pool,
        client_id=client_id,
        client_ids=client_ids,
        region=q.region,
        status=q.status,
        limit=q.limit,
        offset=q.offset,
    )
    return BidList(
        bids=[_bid_from_row(r) for r in rows], total_count=total, offset=q.offset, limit=q.limit
    )


def _ms(value: dt.datetime | None) -> int:
    return 0 if value is None else round(value.timestamp() * 1000)


def _bid_from_row(row: asyncpg.Record) -> BidOut:
    ram, vram = row["ram_gb"], row["vram_gb"]
    filled_ram, filled_vram = row["filled_ram_gb"], row["filled_vram_gb"]
    return BidOut(
        bid_id=row["id"].hex,
        client_id=str(row["client_id"]),
        region=row["region"],
        ram_gb=ram,
        vram_gb=vram,
        duration_sec=row["duration_sec"],
        max_price_per_gb_sec=to_usd(row["max_price_pusd"]),
        client_lat=None if row["latitude"] is None else float(row["latitude"]),
        client_lng=None if row["longitude"] is None else float(row["longitude"]),
        max_distance_km=row["max_distance_km"],
        min_uptime_score=float(row["min_uptime_score"]),
        prefer_local=row["prefer_local"],
        node_type=row["node_type"],
        allow_split=row["allow_split"],
        min_fill_gb=row["min_fill_gb"],
        filled_ram_gb=filled_ram,
        filled_vram_gb=filled_vram,
        remaining_ram_gb=ram - filled_ram,
        remaining_vram_gb=vram - filled_vram,
        status=row["status"],
        created_ms=_ms(row["created_at"]),
        expires_ms=_ms(row["expires_at"]),
        contract_ids=[c.hex for c in row["contract_ids"]],
        max_price_pusd=row["max_price_pusd"],
    )


async def get_bid(call: Call) -> BidOut:
    return bid_out(await _own_bid(call))


async def cancel(call: Call) -> BidOut:
    bid = await _own_bid(call)
    cancelled = await call.state.market.cancel_bid(bid.bid_id, call.now_ms())
    return bid_out(cancelled)


async def book(call: Call) -> BookOut:
    quote = await call.state.market.quote(call.path["region"], call.now_ms())
    return book_out(quote)


OPERATIONS: list[Operation] = [
    Operation(
        "POST",
        "/api/bids",
        place,
        name="place_bid",
        links={
            "GetBid": Link("get_bid", {"bid_id": "$response.body#/bid_id"}),
            "CancelBid": Link("cancel_bid", {"bid_id": "$response.body#/bid_id"}),
            "Book": Link("order_book", {"region": "$response.body#/region"}),
        },
        limit=WRITES,
        summary="Place a limit bid that rests in the region's book until it fills, is cancelled or expires",
        tag="bids",
        body=BidCreateRequest,
        response=BidOut,
        status=201,
        roles=RENTERS,
        idempotent=True,
        errors=(402, 409, 429),
    ),
    Operation(
        "GET",
        "/api/bids",
        list_bids,
        name="list_bids",
        summary="The caller's bids, any status, newest first (from the journal's copy: trails "
        "the live book by its lag)",
        tag="bids",
        query=BidListQuery,
        response=BidList,
    ),
    Operation(
        "GET",
        "/api/bids/{bid_id}",
        get_bid,
        name="get_bid",
        summary="One of the caller's bids, in any state",
        tag="bids",
        response=BidOut,
        errors=(404,),
    ),
    Operation(
        "DELETE",
        "/api/bids/{bid_id}",
        cancel,
        name="cancel_bid",
        limit=WRITES,
        summary="Cancel one of the caller's open bids",
        tag="bids",
        response=BidOut,
        errors=(404, 409),
    ),
    Operation(
        "GET",
        "/api/book/{region}",
        book,
        name="order_book",
        summary="A region's quote and depth (asks and bids by price level); public market data",
        tag="bids",
        response=BookOut,
        auth=False,
    ),
]
