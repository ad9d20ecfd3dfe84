-- DKIM signing keys (`letterbox dkim keygen`), one per (domain, selector).
-- The private key is PKCS#8 PEM; public_key is the record's p= value.
-- created is seconds since the epoch, set by letterbox: the oldest key of
-- each algorithm is the one that signs, so a new key waits until the old
-- one is removed (publish first, then rotate).

CREATE TABLE dkim_keys (
    domain      TEXT    NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    selector    TEXT    NOT NULL,
    algorithm   TEXT    NOT NULL CHECK (algorithm IN ('rsa', 'ed25519')),
    private_key TEXT    NOT NULL,
    public_key  TEXT    NOT NULL,
    created     BIGINT  NOT NULL,
    PRIMARY KEY (domain, selector)
);
