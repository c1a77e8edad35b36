"""The spec's `match_nodes`, transcribed line by line: the oracle the scoring kernels answer to.

Source: the spec's "Matching Algorithm" (backend/services/matching.py). Changes, each marked
`# fix:` where it happens, and nothing else:
- `'distance' in locals()` / `'proximity_score' in locals()`: in the sketch these leak from an
  earlier loop iteration into a later node's result; here they are per-node variables.
- coordinates are tested with `is not None`, not truthiness (a latitude or longitude of 0.0 is a
  location); nodes always have one (`engine.types.Node.lat/lng` are required).
- the haversine `a` is clamped to [0, 1] (rounding near antipodes made `sqrt(1 - a)` raise).
- scores and distances are returned unrounded (rounding is presentation; the kernels are held
  to the oracle at 1e-9, which `round(score, 2)` would defeat).
Field names follow `engine.types.Node` (`node_id`, `lat`, `lng`, `price_pusd`, integer
pico-USD per GB-second); the requirements dict keeps the spec's keys.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple


class Client(NamedTuple):
    latitude: float | None
    longitude: float | None


def calculate_distance(lat1: float, lng1: float, lat2: float, lng2: float) -> float:
    """Calculate distance between two points in km (Haversine formula)"""
    R = 6371  # Earth radius in km

    dlat = math.radians(lat2 - lat1)
    dlng = math.radians(lng2 - lng1)

    a = (
        math.sin(dlat / 2) ** 2
        + math.cos(math.radians(lat1)) * math.cos(math.radians(lat2)) * math.sin(dlng / 2) ** 2
    )
    a = min(1.0, max(0.0, a))  # fix: rounding could push a past 1

    c = 2 * math.atan2(math.sqrt(a), math.sqrt(1 - a))

    return R * c


def match_nodes(
    client: Client, requirements: dict[str, Any], available_nodes: list[Any]
) -> list[dict[str, Any]]:
    """
    Match client requirements to best nodes

    Scoring system (max ~300 points):
    - Proximity: 0-100 points (3x weight if prefer_local)
    - Price: 0-50 points
    - Reliability: 0-50 points (uptime_score * 0.5)
    - Capacity: 0-30 points (overcapacity bonus)
    - Node type bonus: +20 for mist_nodes (community preference)
    """
    ram_needed = requirements["ram_gb"]
    vram_needed = requirements["vram_gb"]
    max_price = requirements["max_price_per_gb_sec"]
    prefer_local = requirements.get("prefer_local", True)
    max_distance = requirements.get("max_distance_km", 10000)

    # Filter nodes that meet hard requirements
    candidates = [
        node
        for node in available_nodes
        if (
            node.available_ram_gb >= ram_needed
            and node.available_vram_gb >= vram_needed
            and node.price_pusd <= max_price
            and node.status == "active"
        )
    ]

    matches = []

    for node in candidates:
        score = 0
        distance = None  # fix: per node, not leaked through locals()
        proximity_score = None

        # 1. PROXIMITY SCORE (most important if prefer_local)
        if client.latitude is not None and client.longitude is not None:  # fix: 0.0 is a place
            distance = calculate_distance(client.latitude, client.longitude, node.lat, node.lng)

            if distance > max_distance:
                continue  # Skip nodes outside max distance

            # Score: 100 at 0km, decreasing to 0 at 1000km
            proximity_score = max(0, 100 - (distance / 10))

            # Apply 3x weight if prefer_local
            if prefer_local:
                score += proximity_score * 3
            else:
                score += proximity_score

        # 2. PRICE SCORE (lower price = higher score)
        price_ratio = 1 - (node.price_pusd / max_price)
        price_score = price_ratio * 50
        score += price_score

        # 3. RELIABILITY SCORE
        reliability_score = node.uptime_score * 0.5  # Max 50 points
        score += reliability_score

        # 4. CAPACITY SCORE (overcapacity = better failover)
        total_needed = ram_needed + vram_needed
        total_available = node.available_ram_gb + node.available_vram_gb
        capacity_ratio = total_available / total_needed
        capacity_score = min(30, capacity_ratio * 10)  # Max 30 points
        score += capacity_score

        # 5. NODE TYPE BONUS (encourage mist node usage)
        if node.node_type == "mist_node":
            score += 20  # Community preference bonus

        # Calculate estimated cost
        duration_sec = requirements.get("duration_sec", 3600)
        total_gb = ram_needed + vram_needed
        estimated_cost = total_gb * duration_sec * node.price_pusd

        matches.append(
            {
                "node_id": str(node.node_id),
                "node_name": node.name,
                "node_type": node.node_type,
                "region": node.region,
                "match_score": score,
                "distance_km": distance,
                "estimated_cost": estimated_cost,
                "estimated_latency_ms": node.base_latency_ms,
                # Score breakdown (for transparency)
                "score_breakdown": {
                    "proximity": proximity_score,
                    "price": price_score,
                    "reliability": reliability_score,
                    "capacity": capacity_score,
                },
            }
        )

    # Sort by match score (highest first)
    matches.sort(key=lambda x: x["match_score"], reverse=True)

    return matches
