"""Mnemo's node agent: what a provider installs to lend a machine's idle RAM and VRAM.

It detects the machine (`agent.detect`), keeps its config (`agent.config`), talks to the gateway
(`agent.client`), heartbeats and follows the contracts on its node (`agent.runner`), and can
simulate a fleet of virtual nodes for demos and load (`agent.fleet`). Console script:
`mnemo-agent` (`agent.cli:main`).

Light dependencies only (msgspec, psutil, websockets, httpx, optionally nvidia-ml-py): nothing
here imports the exchange's packages (`engine`, `persistence`, the gateway's server) or Numba.
The one module of the exchange it imports is `gateway.protocol`, the wire protocol the gateway
serves, which imports only msgspec and the standard library (the wheel ships it).
"""
