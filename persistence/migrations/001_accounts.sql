-- Accounts: users, their API keys, renter profiles (clients), idempotency records.
-- Times are timestamptz (UTC instants). Money columns keep the spec's DECIMAL(10,2) USD.

CREATE TABLE users (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email           varchar(255) NOT NULL UNIQUE,
    password_hash   varchar(255) NOT NULL,
    role            varchar(20) NOT NULL DEFAULT 'user'
                    CHECK (role IN ('user', 'provider', 'admin')),
    full_name       varchar(255),
    organization    varchar(255),
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_login      timestamptz
    -- The spec's users.api_key and users.jwt_secret are deliberately absent: keys live in
    -- api_keys as hashes only, and tokens are signed with the service's MNEMO_JWT_SECRET.
);

-- One account per address whatever its case; look users up with lower(email) = lower($1).
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));

-- API keys are shown once at creation and stored only as the SHA-256 of the whole key
-- (lowercase hex). `prefix` is the key's first characters, kept so a user can tell keys apart.
CREATE TABLE api_keys (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    prefix          varchar(32) NOT NULL,
    key_hash        char(64) NOT NULL UNIQUE CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    name            varchar(100),
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz,
    revoked_at      timestamptz
);

CREATE INDEX idx_api_keys_user ON api_keys (user_id);

-- Renter profiles (the spec's clients table); each belongs to a user.
CREATE TABLE clients (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id             uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    org_name            varchar(255) NOT NULL,

    -- Location for proximity matching
    default_region      varchar(50),
    latitude            decimal(9, 6) CHECK (latitude BETWEEN -90 AND 90),
    longitude           decimal(9, 6) CHECK (longitude BETWEEN -180 AND 180),

    -- Billing
    budget_monthly_usd  decimal(10, 2) CHECK (budget_monthly_usd >= 0),
    current_spend_usd   decimal(10, 2) NOT NULL DEFAULT 0,

    -- Preferences
    prefer_local        boolean NOT NULL DEFAULT true,
    max_latency_ms      decimal(8, 3) CHECK (max_latency_ms >= 0),
    min_reliability     decimal(5, 2) CHECK (min_reliability BETWEEN 0 AND 100),

    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX idx_clients_user ON clients (user_id);

-- Idempotency-Key records: the first response to a (user, key) is kept and replayed for a retry
-- with the same request (same request_hash, the SHA-256 hex of method, path and body); a retry
-- with a different request is refused. A row whose status_code is NULL is a request still in
-- flight (claimed by INSERT ... ON CONFLICT DO NOTHING before the work starts).
CREATE TABLE idempotency_keys (
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key             varchar(255) NOT NULL,
    request_hash    char(64) NOT NULL,
    status_code     smallint CHECK (status_code BETWEEN 100 AND 599),
    response_body   bytea,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);

-- Expiry sweeps delete old records by age.
CREATE INDEX idx_idempotency_keys_created ON idempotency_keys (created_at);
