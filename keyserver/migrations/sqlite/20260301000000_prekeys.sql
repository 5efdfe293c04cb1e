-- v3: each active user's newest signed prekey (PUT /users/<name>/prekey), kept byte for
-- byte as uploaded. One row per user; deleting the user deletes it (ON DELETE CASCADE).
CREATE TABLE prekeys (
    username    TEXT    PRIMARY KEY NOT NULL REFERENCES users (username) ON DELETE CASCADE,
    created_ms  BIGINT  NOT NULL,              -- prekey.created, Unix ms
    expires_ms  BIGINT  NOT NULL,              -- prekey.expires, Unix ms: not served from then on
    body        BLOB    NOT NULL,              -- the request body, verbatim
    stored_ms   BIGINT  NOT NULL               -- when it was uploaded, Unix ms
);
