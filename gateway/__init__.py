"""The HTTP and WebSocket edge of Mnemo: a Starlette app served by uvicorn.

`gateway.app.create_app(settings)` builds the app; `gateway.app:app_from_env` is the uvicorn
factory. The app holds no market state of its own: Redis (through `engine.market.Market` and the
`engine.view.MarketView` read model) and Postgres (accounts, history) hold everything.

This file imports nothing, so that the node agent and clients can import `gateway.protocol`
(msgspec only) without the exchange's dependencies.
"""
