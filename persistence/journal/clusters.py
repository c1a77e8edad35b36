"""The `clusters` rows: each region's nodes summed up, recomputed from `nodes` (the worker does
it at most about once a second per region whose nodes changed).
"""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

__all__ = ["refresh_clusters"]


_CLUSTERS_SQL = """
INSERT INTO clusters AS c (
    region, total_nodes, active_nodes, datacenter_nodes, edge_nodes, mist_nodes,
    total_ram_gb, available_ram_gb, total_vram_gb, available_vram_gb, offered_ram_gb,
    offered_vram_gb, reserved_ram_gb, reserved_vram_gb, avg_price_pusd, center_latitude,
    center_longitude, last_updated)
SELECT r.region,
       count(n.id),
       count(n.id) FILTER (WHERE n.status = 'active'),
       count(n.id) FILTER (WHERE n.node_type = 'datacenter'),
       count(n.id) FILTER (WHERE n.node_type = 'edge_cluster'),
       count(n.id) FILTER (WHERE n.node_type = 'mist_node'),
       coalesce(sum(n.total_ram_gb), 0),
       coalesce(sum(n.available_ram_gb) FILTER (WHERE n.status = 'active'), 0),
       coalesce(sum(n.total_vram_gb), 0),
       coalesce(sum(n.available_vram_gb) FILTER (WHERE n.status = 'active'), 0),
       coalesce(sum(n.offered_ram_gb) FILTER (WHERE n.status = 'active'), 0),
       coalesce(sum(n.offered_vram_gb) FILTER (WHERE n.status = 'active'), 0),
       coalesce(sum(n.reserved_ram_gb), 0),
       coalesce(sum(n.reserved_vram_gb), 0),
       round(avg(n.price_pusd) FILTER (WHERE n.status = 'active'), 6),
       round(avg(n.latitude), 6),
       round(avg(n.longitude), 6),
       now()
FROM unnest($1::text[]) AS r(region)
LEFT JOIN nodes n ON n.region = r.region AND n.status <> 'deactivated'
GROUP BY r.region
ON CONFLICT (region) DO UPDATE SET
    total_nodes = EXCLUDED.total_nodes, active_nodes = EXCLUDED.active_nodes,
    datacenter_nodes = EXCLUDED.datacenter_nodes, edge_nodes = EXCLUDED.edge_nodes,
    mist_nodes = EXCLUDED.mist_nodes, total_ram_gb = EXCLUDED.total_ram_gb,
    available_ram_gb = EXCLUDED.available_ram_gb, total_vram_gb = EXCLUDED.total_vram_gb,
    available_vram_gb = EXCLUDED.available_vram_gb, offered_ram_gb = EXCLUDED.offered_ram_gb,
    offered_vram_gb = EXCLUDED.offered_vram_gb, reserved_ram_gb = EXCLUDED.reserved_ram_gb,
    reserved_vram_gb = EXCLUDED.reserved_vram_gb, avg_price_pusd = EXCLUDED.avg_price_pusd,
    center_latitude = EXCLUDED.center_latitude, center_longitude = EXCLUDED.center_longitude,
    last_updated = EXCLUDED.last_updated
"""


async def refresh_clusters(conn: asyncpg.Connection, regions: Iterable[str]) -> None:
    """Recompute the `clusters` rows of `regions` from `nodes` (the journal does this at most
    about once a second per changed region; call it to make them current now)."""
    regions = sorted(set(regions))
    if regions:
        await conn.execute(_CLUSTERS_SQL, regions)
