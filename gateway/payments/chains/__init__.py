"""Chain verifiers: Ethereum (`eth`) and Solana (`solana`), one shape of answer (`transfers`)."""
