-- Greylisting ([greylist]): one row per (client network, sender, recipient)
-- seen at RCPT while greylisting is on. Times are milliseconds since the
-- Unix epoch, written by letterbox, so that every backend (and every
-- instance sharing the database) reads them the same way.

CREATE TABLE greylist (
    -- 192.0.2.0/24 or 2001:db8:1:2::/64
    network       TEXT    NOT NULL,
    -- normalized; empty for the null sender <>
    sender        TEXT    NOT NULL,
    -- normalized
    recipient     TEXT    NOT NULL,
    -- the sender's domain, for "SPF passed for a domain that passed before"
    sender_domain TEXT    NOT NULL,
    -- the first attempt (a forgotten triplet starts again)
    first_seen    BIGINT  NOT NULL,
    -- when it last passed (or was first seen)
    last_seen     BIGINT  NOT NULL,
    -- a retry came after greylist.delay: it passes until last_seen + pass_for
    passed        BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (network, sender, recipient)
);
CREATE INDEX greylist_sender_domain ON greylist(sender_domain);
