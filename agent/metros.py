"""Where a simulated fleet's supply sits: metros of each region, weighted by how much supply the
region has (Long Island/NYC for us-east-2, the SF Bay for us-west-1, London/Dublin,
Frankfurt/Munich, Tokyo, Singapore, ...), each with its spread and its time zone.

Data only. `agent.population` places virtual nodes around these metros; the demo renter bot
(`scripts/renter_bot.py`) places its renters by the same table, so demand meets supply.
"""

from __future__ import annotations

import msgspec

__all__ = ["METROS", "Metro"]


class Metro(msgspec.Struct, frozen=True):
    """A cluster of supply: a region, a centre, a spread, a time zone and a share of nodes."""

    region: str
    name: str
    lat: float
    lng: float
    tz: str
    weight: float
    spread_km: float = 25.0


METROS: tuple[Metro, ...] = (
    # us-east-2: the spec's home, a dense Long Island / NYC mesh of consumer GPUs.
    Metro("us-east-2", "Queens", 40.7282, -73.7949, "America/New_York", 7, 8),
    Metro("us-east-2", "Manhattan", 40.7831, -73.9712, "America/New_York", 6, 5),
    Metro("us-east-2", "Brooklyn", 40.6782, -73.9442, "America/New_York", 5, 6),
    Metro("us-east-2", "Long Island", 40.7891, -73.1350, "America/New_York", 5, 30),
    Metro("us-east-2", "Jersey City", 40.7178, -74.0431, "America/New_York", 2, 10),
    Metro("us-east-1", "Ashburn", 39.0438, -77.4874, "America/New_York", 5, 15),
    Metro("us-east-1", "Washington", 38.9072, -77.0369, "America/New_York", 3, 20),
    Metro("us-central-1", "Chicago", 41.8781, -87.6298, "America/Chicago", 5, 30),
    Metro("us-central-1", "Dallas", 32.7767, -96.7970, "America/Chicago", 3, 35),
    Metro("us-west-1", "San Francisco", 37.7749, -122.4194, "America/Los_Angeles", 5, 10),
    Metro("us-west-1", "San Jose", 37.3382, -121.8863, "America/Los_Angeles", 4, 15),
    Metro("us-west-1", "Oakland", 37.8044, -122.2712, "America/Los_Angeles", 2, 10),
    Metro("us-west-2", "Seattle", 47.6062, -122.3321, "America/Los_Angeles", 3, 20),
    Metro("us-west-2", "Hillsboro", 45.5229, -122.9898, "America/Los_Angeles", 2, 15),
    Metro("eu-west-1", "London", 51.5074, -0.1278, "Europe/London", 7, 25),
    Metro("eu-west-1", "Dublin", 53.3498, -6.2603, "Europe/Dublin", 4, 15),
    Metro("eu-central-1", "Frankfurt", 50.1109, 8.6821, "Europe/Berlin", 6, 20),
    Metro("eu-central-1", "Munich", 48.1351, 11.5820, "Europe/Berlin", 3, 20),
    Metro("eu-central-1", "Amsterdam", 52.3676, 4.9041, "Europe/Amsterdam", 3, 15),
    Metro("ap-northeast-1", "Tokyo", 35.6762, 139.6503, "Asia/Tokyo", 7, 25),
    Metro("ap-northeast-1", "Yokohama", 35.4437, 139.6380, "Asia/Tokyo", 2, 10),
    Metro("ap-southeast-1", "Singapore", 1.3521, 103.8198, "Asia/Singapore", 4, 12),
    Metro("ap-south-1", "Mumbai", 19.0760, 72.8777, "Asia/Kolkata", 3, 25),
    Metro("ap-south-1", "Bengaluru", 12.9716, 77.5946, "Asia/Kolkata", 3, 20),
    Metro("sa-east-1", "Sao Paulo", -23.5505, -46.6333, "America/Sao_Paulo", 3, 30),
)
