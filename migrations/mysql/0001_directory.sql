-- The directory: served domains, their mailboxes, aliases and sink rules.
-- Names are stored normalized (lowercase, IDNA) by letterbox; maildir paths
-- are built from them, so they are never written by anything else.
-- utf8mb4_bin: names compare byte for byte, as on SQLite and PostgreSQL.

CREATE TABLE domains (
    name        VARCHAR(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    active      BOOLEAN      NOT NULL DEFAULT TRUE,
    created_at  TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at  TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE users (
    domain      VARCHAR(255) NOT NULL,
    local_part  VARCHAR(64)  NOT NULL,
    -- {ARGON2ID}$argon2id$… ; NULL for a receive-only mailbox
    password    TEXT,
    active      BOOLEAN      NOT NULL DEFAULT TRUE,
    -- bytes, 0 = unlimited
    quota       BIGINT       NOT NULL DEFAULT 0,
    created_at  TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at  TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (domain, local_part),
    FOREIGN KEY (domain) REFERENCES domains(name) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- One row per (source, destination). source is local@domain, or @domain for
-- the domain's catch-all.
CREATE TABLE aliases (
    domain      VARCHAR(255) NOT NULL,
    source      VARCHAR(255) NOT NULL,
    destination VARCHAR(255) NOT NULL,
    active      BOOLEAN      NOT NULL DEFAULT TRUE,
    created_at  TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (source, destination),
    KEY aliases_domain (domain),
    FOREIGN KEY (domain) REFERENCES domains(name) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE sink_rules (
    -- *.tmp.example.org or an exact domain
    pattern     VARCHAR(255) NOT NULL PRIMARY KEY,
    ttl_seconds BIGINT       NOT NULL,
    active      BOOLEAN      NOT NULL DEFAULT TRUE,
    created_at  TIMESTAMP    NOT NULL DEFAULT CURRENT_TIMESTAMP
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Dovecot: password_query = SELECT username AS user, password FROM dovecot_passdb WHERE username = '%u'
CREATE VIEW dovecot_passdb AS
    SELECT CONCAT(u.local_part, '@', u.domain) AS username, u.password AS password
    FROM users u JOIN domains d ON d.name = u.domain
    WHERE u.active AND d.active AND u.password IS NOT NULL;
