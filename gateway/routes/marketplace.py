"""The marketplace: browse live asks, and ask for ranked matches.

Both read this process's `MarketView` (columnar books kept current from the region streams, at
most milliseconds stale), never the market in Redis per request; the atomic reserve at contract
creation is the truth. Any authenticated caller may browse and request (looking is harmless;
taking needs a client of one's own). Ranking is the costly part, so a request counts against the
account's write limit (one Redis call); browsing does not.

The renter's location for `POST /api/marketplace/request`: `client_lat`/`client_lng` in the
body, else the profile named by `client_id` (which must be the caller's), else the caller's
oldest client profile; `location_source` in the response says which was used. The same profile's
stored preferences apply where the body does not give its own: `min_reliability` as
`min_uptime_score` (the measured score, engine.trust) and `max_latency_ms` (a node's
`base_latency_ms` at most that).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal, NamedTuple

import asyncpg

from engine import trust
from engine.scoring import Match, MatchRequest, browse
from gateway.auth import Principal
from gateway.errors import ValidationFailed
from gateway.operations import Call, Link, Operation
from gateway.ratelimit import WRITES
from gateway.routes.accounts import first_client, owned_client
from gateway.schemas import (
    MarketplaceQuery,
    MarketplaceResponse,
    MatchOut,
    MatchResponse,
    OfferOut,
    ScoreBreakdown,
    to_pusd,
    to_usd,
)
from gateway.schemas import MatchRequest as MatchBody

__all__ = ["OPERATIONS", "ClientProfiles"]


def _pair(lat: float | None, lng: float | None, lat_name: str) -> None:
    if (lat is None) != (lng is None):
        raise ValidationFailed("give client_lat and client_lng together", field=lat_name)


async def browse_market(call: Call) -> MarketplaceResponse:
    q: MarketplaceQuery = call.query
    _pair(q.client_lat, q.client_lng, "client_lat")
    if q.max_distance_km is not None and q.client_lat is None:
        raise ValidationFailed(
            "max_distance_km needs client_lat and client_lng", field="max_distance_km"
        )
    max_price = None
    if q.max_price_per_gb_sec is not None:
        max_price = max(1, to_pusd(q.max_price_per_gb_sec))
    offers, total = browse(
        call.state.view.books(),
        now_ms=call.now_ms(),
        node_type=q.node_type,
        region=q.region,
        min_ram_gb=q.min_ram_gb or 0,
        min_vram_gb=q.min_vram_gb or 0,
        max_price_pusd=max_price,
        min_uptime_score=q.min_uptime_score or 0.0,
        lat=q.client_lat,
        lng=q.client_lng,
        max_distance_km=q.max_distance_km,
        offset=q.offset,
        limit=q.limit,
    )
    return MarketplaceResponse(
        offers=[
            OfferOut(
                node_id=o.node_id,
                node_name=o.node_name,
                node_type=o.node_type,
                region=o.region,
                available_ram_gb=o.available_ram_gb,
                available_vram_gb=o.available_vram_gb,
                price_per_gb_sec=to_usd(o.price_pusd),
                uptime_score=o.uptime_score,
                distance_km=None if o.distance_km is None else round(o.distance_km, 3),
                estimated_latency_ms=o.estimated_latency_ms,
                price_pusd=o.price_pusd,
                uptime_new=o.uptime_windows < trust.MIN_WINDOWS,
                reputation_score=o.reputation_score,
                stake_usd=to_usd(o.stake_pusd),
                stake_pusd=o.stake_pusd,
                stake_held_usd=to_usd(o.stake_held_pusd),
                stake_held_pusd=o.stake_held_pusd,
            )
            for o in offers
        ],
        total_count=total,
        offset=q.offset,
        limit=q.limit,
    )


async def request_matches(call: Call) -> MatchResponse:
    body: MatchBody = call.body
    _pair(body.client_lat, body.client_lng, "client_lat")
    if body.ram_gb + body.vram_gb == 0:
        raise ValidationFailed("ask for some memory: ram_gb + vram_gb must be > 0", field="ram_gb")
    cap = to_pusd(body.max_price_per_gb_sec)
    if cap < 1:
        raise ValidationFailed(
            "price cap below 1e-12 USD per GB-second", field="max_price_per_gb_sec"
        )
    source: Literal["body", "client_profile", "none"] = "body"
    lat, lng = body.client_lat, body.client_lng
    min_uptime, max_latency = body.min_uptime_score, body.max_latency_ms
    profile: Profile | None = None
    if lat is None or min_uptime is None or max_latency is None or body.client_id is not None:
        # the renter's stored preferences apply where the request does not say otherwise
        profile = await call.state.profiles.get(call.state.pool, call.user, body.client_id)
    if lat is None:
        if profile is not None and profile.lat is not None and profile.lng is not None:
            lat, lng, source = profile.lat, profile.lng, "client_profile"
        else:
            source = "none"
    if min_uptime is None:
        min_uptime = (
            0.0 if profile is None or profile.min_reliability is None else profile.min_reliability
        )
    if max_latency is None and profile is not None:
        max_latency = profile.max_latency_ms
    req = MatchRequest(
        ram_gb=body.ram_gb,
        vram_gb=body.vram_gb,
        max_price_pusd=cap,
        duration_s=body.duration_sec,
        lat=lat,
        lng=lng,
        prefer_local=body.prefer_local,
        max_distance_km=body.max_distance_km,
        min_uptime_score=min_uptime,
        node_type=body.node_type,
        region=body.region,
        limit=body.limit,
        max_latency_ms=max_latency,
    )
    # rank_all validates the request (InvalidRequest -> 422).
    matches = call.state.view.rank_all(req, call.now_ms(), body.limit)
    return MatchResponse(
        request_id=uuid.uuid4().hex,
        location_source=source,
        matches=[_match_out(m) for m in matches],
    )


class Profile(NamedTuple):
    """What an RFQ reads of a renter profile (the `clients` row)."""

    lat: float | None
    lng: float | None
    min_reliability: float | None
    max_latency_ms: float | None


class ClientProfiles:
    """The renter profiles RFQs read, cached in the process. A profile never changes once
    created (no route edits one), so a profile found is kept (up to `max_size`, then the cache
    starts afresh); a lookup that found none is not (the user may create one)."""

    def __init__(self, max_size: int = 10_000) -> None:
        self.max_size = max_size
        self._found: dict[tuple[str, str | None], Profile] = {}

    async def get(
        self, pool: asyncpg.Pool, principal: Principal, client_id: str | None
    ) -> Profile | None:
        """The profile named by `client_id` (403 unless it is the caller's), else the caller's
        oldest; None when the caller has none."""
        key = (principal.user_id, client_id)
        found = self._found.get(key)
        if found is not None:
            return found
        row: asyncpg.Record | None
        if client_id is not None:
            row = await owned_client(pool, principal, client_id)
        else:
            row = await first_client(pool, principal)
        if row is None:
            return None
        profile = Profile(
            lat=_float(row["latitude"]),
            lng=_float(row["longitude"]),
            min_reliability=_float(row["min_reliability"]),
            max_latency_ms=_float(row["max_latency_ms"]),
        )
        if len(self._found) >= self.max_size:
            self._found.clear()
        self._found[key] = profile
        return profile


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _match_out(m: Match) -> MatchOut:
    proximity = round(m.proximity_score, 2)
    price = round(m.price_score, 2)
    reliability = round(m.reliability_score, 2)
    capacity = round(m.capacity_score, 2)
    return MatchOut(
        node_id=m.node_id,
        node_name=m.node_name,
        node_type=m.node_type,
        region=m.region,
        match_score=round(m.match_score, 2),
        proximity_score=proximity,
        price_score=price,
        reliability_score=reliability,
        capacity_score=capacity,
        score_breakdown=ScoreBreakdown(
            proximity=proximity,
            price=price,
            reliability=reliability,
            capacity=capacity,
            type_bonus=m.type_bonus,
        ),
        distance_km=None if m.distance_km is None else round(m.distance_km, 3),
        estimated_cost=to_usd(m.estimated_cost_pusd),
        estimated_latency_ms=m.estimated_latency_ms,
        price_per_gb_sec=to_usd(m.price_pusd),
        available_ram_gb=m.available_ram_gb,
        available_vram_gb=m.available_vram_gb,
        uptime_score=m.uptime_score,
        estimated_cost_pusd=m.estimated_cost_pusd,
        price_pusd=m.price_pusd,
        uptime_new=m.uptime_windows < trust.MIN_WINDOWS,
        reputation_score=m.reputation_score,
    )


OPERATIONS: list[Operation] = [
    Operation(
        "GET",
        "/api/marketplace",
        browse_market,
        name="browse_marketplace",
        links={
            "GetNode": Link("get_node", {"node_id": "$response.body#/offers/0/node_id"}),
        },
        summary="Browse live asks with free capacity (cheapest first), with distance and latency",
        tag="marketplace",
        query=MarketplaceQuery,
        response=MarketplaceResponse,
    ),
    Operation(
        "POST",
        "/api/marketplace/request",
        request_matches,
        name="request_matches",
        links={
            "TakeMatch": Link(
                "create_contract",
                body={
                    "node_id": "$response.body#/matches/0/node_id",
                    "client_id": "$request.body#/client_id",
                },
            ),
            "GetNode": Link("get_node", {"node_id": "$response.body#/matches/0/node_id"}),
        },
        limit=WRITES,
        summary="Ranked matches for a memory request, with score breakdown and estimated cost",
        tag="marketplace",
        body=MatchBody,
        response=MatchResponse,
    ),
]
