"""Postgres: the schema and its migrations, the journal (Redis Streams -> Postgres), history queries.

Postgres holds accounts (users, API keys, clients, idempotency records) and the full history of the
market; the live market itself is in Redis. Nothing here decides anything about the market.
"""
