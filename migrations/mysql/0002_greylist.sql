-- Greylisting ([greylist]): one row per (client network, sender, recipient)
-- seen at RCPT while greylisting is on. Times are milliseconds since the
-- Unix epoch, written by letterbox, so that every backend (and every
-- instance sharing the database) reads them the same way.
-- letterbox cuts sender and recipient to 320 characters, so the key stays
-- within InnoDB's 3072 bytes: (50 + 320 + 320) × 4.

CREATE TABLE greylist (
    -- 192.0.2.0/24 or 2001:db8:1:2::/64
    network       VARCHAR(50)  NOT NULL,
    -- normalized; empty for the null sender <>
    sender        VARCHAR(320) NOT NULL,
    -- normalized
    recipient     VARCHAR(320) NOT NULL,
    -- the sender's domain, for "SPF passed for a domain that passed before"
    sender_domain VARCHAR(255) NOT NULL,
    -- the first attempt (a forgotten triplet starts again)
    first_seen    BIGINT       NOT NULL,
    -- when it last passed (or was first seen)
    last_seen     BIGINT       NOT NULL,
    -- a retry came after greylist.delay: it passes until last_seen + pass_for
    passed        BOOLEAN      NOT NULL DEFAULT FALSE,
    PRIMARY KEY (network, sender, recipient),
    KEY greylist_sender_domain (sender_domain)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
