"""Payment rails: cards (Stripe) and crypto (Ethereum, Solana)."""
