-- One row per username: pending (active = FALSE) until the activation link is
-- followed, then active with its signed answer. Tokens are kept only as SHA-256.
CREATE TABLE users (
    username            TEXT    PRIMARY KEY NOT NULL,  -- lower-cased, ^[a-z0-9_-]{3,32}$
    email               TEXT    NOT NULL,              -- as registered, where the mail went
    email_key           TEXT    NOT NULL,              -- lower-cased, for the per-address cap
    public_key_message  TEXT    NOT NULL,              -- PEM, verbatim as registered
    public_key_sign     TEXT    NOT NULL,              -- PEM, verbatim as registered
    activation_hash     BYTEA,                         -- SHA-256 of the activation token; NULL once active
    delete_hash         BYTEA   NOT NULL,              -- SHA-256 of the delete token
    created_ms          BIGINT  NOT NULL,              -- Unix ms
    expires_ms          BIGINT  NOT NULL,              -- pending rows are dead from then on
    active              BOOLEAN NOT NULL DEFAULT FALSE,
    activated_ms        BIGINT,
    answer              BYTEA                          -- the signed body of GET /users/<username>
);

CREATE INDEX users_pending_email ON users (email_key) WHERE active = FALSE;
CREATE INDEX users_pending_expiry ON users (expires_ms) WHERE active = FALSE;
