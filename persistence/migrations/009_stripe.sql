-- Cards (Stripe PaymentIntents), their refunds and webhook events; providers' Stripe Connect
-- accounts and their payouts (issue 14). Written by gateway/payments/stripe_*.py through
-- persistence/card_payments.py and persistence/payouts.py, never by the journal.
--
-- Amounts are Stripe's: integer US cents (`*_cents`), with the ledger's pico-USD twin generated
-- (1 cent = 1e10 pico-USD). The money itself moves in the ledger; these rows are the Stripe side
-- of each movement and the idempotency records that make every step happen once.

-- One card payment: a top-up of a client's balance, or one that funds a contract (contract_id:
-- no foreign key, since an active contract is in the live market before the journal writes it).
-- (user_id, idempotency_key) is the caller's Idempotency-Key; stripe_idempotency_key, derived
-- from the row's id, is what every attempt at Stripe carries, so a retry after a lost answer
-- finds the same PaymentIntent. credited_at: the ledger credit (keyed by the PaymentIntent) is
-- done.
CREATE TABLE card_payments (
    id                     uuid PRIMARY KEY,
    user_id                uuid NOT NULL REFERENCES users (id),
    client_id              uuid NOT NULL REFERENCES clients (id),
    contract_id            uuid,
    idempotency_key        varchar(255) NOT NULL,
    request_hash           char(64) NOT NULL,
    stripe_idempotency_key varchar(255) NOT NULL UNIQUE,
    amount_cents           bigint NOT NULL CHECK (amount_cents > 0),
    amount_pusd            bigint GENERATED ALWAYS AS (amount_cents * 10000000000) STORED,
    currency               char(3) NOT NULL DEFAULT 'usd',
    payment_intent_id      varchar(255) UNIQUE,
    status                 varchar(32) NOT NULL DEFAULT 'creating' CHECK (status IN (
        'creating', 'requires_payment_method', 'requires_confirmation', 'requires_action',
        'processing', 'requires_capture', 'canceled', 'succeeded', 'failed')),
    error_code             varchar(100),
    error_message          text,
    refunded_cents         bigint NOT NULL DEFAULT 0,
    credited_at            timestamptz,
    attempt_at             timestamptz NOT NULL DEFAULT now(),
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, idempotency_key),
    CHECK (refunded_cents BETWEEN 0 AND amount_cents)
);
CREATE INDEX idx_card_payments_client ON card_payments (client_id, created_at);
CREATE INDEX idx_card_payments_contract ON card_payments (contract_id)
    WHERE contract_id IS NOT NULL;

-- One refund of a card payment: asked through the API (requested_by and the caller's
-- Idempotency-Key; the row's id is the idempotency key sent to Stripe) or made elsewhere (the
-- Stripe dashboard: requested_by NULL, learnt from a webhook). The ledger debit is keyed by the
-- row's id: debited_at says it is done; reversed_at that a refund Stripe failed was credited back.
CREATE TABLE card_refunds (
    id                     uuid PRIMARY KEY,
    payment_id             uuid NOT NULL REFERENCES card_payments (id),
    requested_by           uuid REFERENCES users (id),
    idempotency_key        varchar(255),
    request_hash           char(64),
    amount_cents           bigint NOT NULL CHECK (amount_cents > 0),
    amount_pusd            bigint GENERATED ALWAYS AS (amount_cents * 10000000000) STORED,
    reason                 text NOT NULL DEFAULT '',
    stripe_refund_id       varchar(255) UNIQUE,
    status                 varchar(20) NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'requires_action', 'succeeded', 'failed', 'canceled')),
    error_message          text,
    debited_at             timestamptz,
    reversed_at            timestamptz,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    UNIQUE (requested_by, idempotency_key)
);
CREATE INDEX idx_card_refunds_payment ON card_refunds (payment_id);

-- Every Stripe webhook event taken in, once: a redelivery finds its row (processed_at set) and
-- changes nothing.
CREATE TABLE stripe_events (
    event_id      varchar(255) PRIMARY KEY,
    type          varchar(100) NOT NULL,
    object_id     varchar(255) NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    processed_at  timestamptz,
    outcome       text
);

-- A provider's Stripe Connect (Express) account; one per user.
CREATE TABLE connect_accounts (
    user_id            uuid PRIMARY KEY REFERENCES users (id),
    stripe_account_id  varchar(255) NOT NULL UNIQUE,
    transfers_active   boolean NOT NULL DEFAULT false,
    details_submitted  boolean NOT NULL DEFAULT false,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- One payout per provider and settlement period (a UTC day): the amount is fixed when the row is
-- written, before Stripe is called; stripe_idempotency_key (derived from provider, period and
-- attempt) makes every call find the same transfer, so a rerun or a crash between Stripe's
-- answer and our write never pays twice. A payout Stripe refused ('failed') is tried again by a
-- later run as a new attempt (a new key: Stripe replays a key's refusal too). 'paid' rows are in the ledger (provider_payable -> stripe), in the
-- same transaction that marks them; 'failed' ones moved no money.
CREATE TABLE provider_payouts (
    id                     uuid PRIMARY KEY,
    user_id                uuid NOT NULL REFERENCES users (id),
    period                 date NOT NULL,
    stripe_account_id      varchar(255) NOT NULL,
    amount_cents           bigint NOT NULL CHECK (amount_cents > 0),
    amount_pusd            bigint GENERATED ALWAYS AS (amount_cents * 10000000000) STORED,
    transfer_group         varchar(100) NOT NULL,
    attempt                integer NOT NULL DEFAULT 1,
    stripe_idempotency_key varchar(255) NOT NULL UNIQUE,
    stripe_transfer_id     varchar(255) UNIQUE,
    status                 varchar(20) NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'paid', 'failed')),
    error_message          text,
    created_at             timestamptz NOT NULL DEFAULT now(),
    paid_at                timestamptz,
    UNIQUE (user_id, period)
);
CREATE INDEX idx_provider_payouts_period ON provider_payouts (period);
