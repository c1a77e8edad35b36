-- 011_web_sessions: sign-in sessions of the web app (gateway/web).
--
-- A browser signs in with email and password and gets an opaque session token in an HttpOnly
-- cookie; only the token's SHA-256 (hex) is stored, as for API keys, so this table cannot be
-- replayed against the gateway. A session ends at `expires_at` (fixed at sign-in, never
-- extended) or when its row is deleted (sign-out, or the user's deletion).
CREATE TABLE web_sessions (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash      char(64) NOT NULL UNIQUE CHECK (token_hash ~ '^[0-9a-f]{64}$'),
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    CHECK (expires_at > created_at)
);

-- A user's sessions (expired ones are swept at that user's next sign-in).
CREATE INDEX idx_web_sessions_user ON web_sessions (user_id);
