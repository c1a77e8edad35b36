-- 010_crypto_payments: on-chain payments (Ethereum: ETH and an ERC-20; Solana: SOL and SPL USDC).
--
-- A renter asks to pay an amount of USD in an asset and gets a payment request: the amount in
-- the asset's integer base units (priced with a rate no older than its bound) and what binds a
-- transfer to the request (Ethereum: a deposit address of its own, derived from the operator's
-- xpub at `derivation_index`; Solana: a reference key the transfer must carry, as Solana Pay
-- does). The renter pays and submits the transaction; the gateway verifies it on chain.
--
-- One transfer is credited once: `crypto_payments` is unique on (network, tx_id, log_index) in
-- every state, and the row is written before the market's credit is asked for (keyed on the
-- same string), so neither a replay, a second request, nor a retry after a crash credits twice.

-- Operator-set USD prices of volatile assets (ETH, SOL); fixed rates (stablecoins) come from
-- the configuration. One row per change: the newest is the rate, the rest its history.
CREATE TABLE crypto_rates (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    asset           varchar(10) NOT NULL CHECK (asset ~ '^[A-Z0-9]{1,10}$'),
    usd_per_unit    numeric(30, 12) NOT NULL CHECK (usd_per_unit > 0),
    set_at          timestamptz NOT NULL DEFAULT now(),
    set_by          uuid REFERENCES users (id) ON DELETE SET NULL
);

CREATE INDEX idx_crypto_rates_asset ON crypto_rates (asset, set_at DESC, id DESC);

-- Ethereum deposit addresses are children of the xpub by this number (BIP-32, non-hardened).
CREATE SEQUENCE crypto_derivation_index MINVALUE 0 START 0;

CREATE TABLE crypto_requests (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    client_id           uuid NOT NULL REFERENCES clients (id) ON DELETE CASCADE,
    user_id             uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    blockchain          varchar(10) NOT NULL CHECK (blockchain IN ('ethereum', 'solana')),
    -- eip155:<chain id> or solana:<genesis hash>
    network             varchar(80) NOT NULL,
    asset               varchar(10) NOT NULL,
    -- the ERC-20 contract or the SPL mint; NULL for the chain's own coin
    token               varchar(64),
    amount_pusd         bigint NOT NULL CHECK (amount_pusd > 0),
    amount_base         numeric(78, 0) NOT NULL CHECK (amount_base > 0),
    decimals            smallint NOT NULL,
    usd_per_unit        numeric(30, 12) NOT NULL,
    rate_set_at         timestamptz,
    -- where the payer sends it: the deposit address (Ethereum) or the receiving wallet (Solana)
    pay_to              varchar(64) NOT NULL,
    -- Solana: the reference key the transfer must carry; Ethereum: NULL (the address binds)
    reference           varchar(64),
    derivation_index    bigint,
    status              varchar(10) NOT NULL DEFAULT 'open'
                        CHECK (status IN ('open', 'pending', 'credited')),
    created_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL,
    credited_at         timestamptz
);

CREATE UNIQUE INDEX crypto_requests_pay_to ON crypto_requests (network, pay_to)
    WHERE reference IS NULL;
CREATE UNIQUE INDEX crypto_requests_reference ON crypto_requests (network, reference)
    WHERE reference IS NOT NULL;
CREATE INDEX idx_crypto_requests_client ON crypto_requests (client_id, created_at DESC);

-- A transfer submitted for a request. tx_id: the 0x-prefixed lowercase hash (Ethereum) or the
-- signature (Solana); log_index: the ERC-20 Transfer log's index, -1 for a whole transaction
-- (native ETH, a Solana signature).
CREATE TABLE crypto_payments (
    network         varchar(80) NOT NULL,
    tx_id           varchar(100) NOT NULL,
    log_index       integer NOT NULL CHECK (log_index >= -1),
    request_id      uuid NOT NULL REFERENCES crypto_requests (id) ON DELETE CASCADE,
    status          varchar(10) NOT NULL
                    CHECK (status IN ('pending', 'confirmed', 'credited', 'failed')),
    amount_base     numeric(78, 0) NOT NULL,
    payer           varchar(64),
    block_number    bigint,
    block_hash      varchar(100),
    confirmations   integer,
    error_code      varchar(40),
    error_message   text,
    credit_key      varchar(200) NOT NULL UNIQUE,
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    credited_at     timestamptz,
    next_check_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (network, tx_id, log_index)
);

-- A request is paid by one transfer: a second one (while the first is live) is refused.
CREATE UNIQUE INDEX crypto_payments_one_per_request ON crypto_payments (request_id)
    WHERE status <> 'failed';
CREATE INDEX idx_crypto_payments_due ON crypto_payments (next_check_at)
    WHERE status IN ('pending', 'confirmed');
