"""The market: domain types, the order book, scoring kernels, the atomic Redis scripts, the engine loop.

Knows nothing about HTTP or Postgres. Configuration for every process lives in `engine.settings`.
"""
