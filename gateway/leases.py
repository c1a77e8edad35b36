"""Lease secrets: the one place a delivered lease's password exists, derived on demand.

Nothing stores a lease's password. It is derived from the exchange's lease key
(`Settings.lease_secret`: `MNEMO_LEASE_KEY`, or a key derived from `MNEMO_JWT_SECRET` under a
label of its own) whenever one of the two parties entitled to it asks:

    username = "lease-<contract id>"
    password = base64url(HMAC-SHA256(lease key, "<contract id>:<node id>")), without padding

The node's agent gets it from `GET /api/nodes/{node_id}/leases/{contract_id}/credentials` (the
node's owner) to configure the lease server's one ACL user; the renter gets it inside the URL of
`GET /api/contracts/{id}/access`. A failover's successor runs on another node, so it has another
password: a dead node's credentials open nothing. The password never reaches Postgres, the
event streams, pub/sub notes, WebSocket frames or the logs (the routes that return it are the
only place it is computed; tests/gateway/test_leases.py scans each of those for it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import quote

from engine.types import Contract
from gateway.protocol import LeaseAccess, LeaseCredentials
from gateway.schemas import lease_endpoint

__all__ = ["lease_access", "lease_credentials", "lease_password", "lease_url", "lease_username"]


def lease_username(contract_id: str) -> str:
    """The lease's one ACL user."""
    return f"lease-{contract_id}"


def lease_password(lease_key: bytes, contract_id: str, node_id: str) -> str:
    """The lease's password on node `node_id` (see the module docstring)."""
    mac = hmac.new(lease_key, f"{contract_id}:{node_id}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def lease_credentials(lease_key: bytes, contract: Contract) -> LeaseCredentials:
    """What the contract's node's agent configures its lease server with."""
    return LeaseCredentials(
        contract_id=contract.contract_id,
        username=lease_username(contract.contract_id),
        password=lease_password(lease_key, contract.contract_id, contract.node_id),
    )


def lease_url(host: str, port: int, tls: bool, username: str, password: str) -> str:
    """A `redis://` (`rediss://` with TLS) URL with the credentials percent-encoded (an IPv6
    host in brackets)."""
    scheme = "rediss" if tls else "redis"
    where = f"[{host}]" if ":" in host else host
    return f"{scheme}://{quote(username, safe='')}:{quote(password, safe='')}@{where}:{port}"


def lease_access(lease_key: bytes, contract: Contract) -> LeaseAccess:
    """How the renter reaches the lease: the URL and credentials once it is ready; no endpoint
    and no credentials for a lease that is not delivered (`delivered` false)."""
    endpoint = lease_endpoint(contract)
    delivered = contract.lease_state != "none"
    username = password = url = None
    if delivered:
        username = lease_username(contract.contract_id)
        password = lease_password(lease_key, contract.contract_id, contract.node_id)
        if endpoint.host is not None and endpoint.port is not None:
            url = lease_url(endpoint.host, endpoint.port, endpoint.tls, username, password)
    return LeaseAccess(
        contract_id=contract.contract_id,
        node_id=contract.node_id,
        kind=endpoint.kind,
        state=endpoint.state,
        delivered=delivered,
        url=url,
        host=endpoint.host,
        port=endpoint.port,
        username=username,
        password=password,
        tls=endpoint.tls,
        expires_ms=contract.end_ms,
    )
