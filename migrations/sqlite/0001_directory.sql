-- The directory: served domains, their mailboxes, aliases and sink rules.
-- Names are stored normalized (lowercase, IDNA) by letterbox; maildir paths
-- are built from them, so they are never written by anything else.

CREATE TABLE domains (
    name        TEXT    NOT NULL PRIMARY KEY,
    active      BOOLEAN NOT NULL DEFAULT 1,
    created_at  TEXT    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at  TEXT    NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE TABLE users (
    domain      TEXT    NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    local_part  TEXT    NOT NULL,
    -- {ARGON2ID}$argon2id$… ; NULL for a receive-only mailbox
    password    TEXT,
    active      BOOLEAN NOT NULL DEFAULT 1,
    -- bytes, 0 = unlimited
    quota       BIGINT  NOT NULL DEFAULT 0,
    created_at  TEXT    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at  TEXT    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (domain, local_part)
);

-- One row per (source, destination). source is local@domain, or @domain for
-- the domain's catch-all.
CREATE TABLE aliases (
    domain      TEXT    NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    source      TEXT    NOT NULL,
    destination TEXT    NOT NULL,
    active      BOOLEAN NOT NULL DEFAULT 1,
    created_at  TEXT    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (source, destination)
);
CREATE INDEX aliases_domain ON aliases(domain);

CREATE TABLE sink_rules (
    -- *.tmp.example.org or an exact domain
    pattern     TEXT    NOT NULL PRIMARY KEY,
    ttl_seconds BIGINT  NOT NULL,
    active      BOOLEAN NOT NULL DEFAULT 1,
    created_at  TEXT    NOT NULL DEFAULT CURRENT_TIMESTAMP
);

-- Dovecot: password_query = SELECT username AS user, password FROM dovecot_passdb WHERE username = '%u'
CREATE VIEW dovecot_passdb AS
    SELECT u.local_part || '@' || u.domain AS username, u.password AS password
    FROM users u JOIN domains d ON d.name = u.domain
    WHERE u.active AND d.active AND u.password IS NOT NULL;
