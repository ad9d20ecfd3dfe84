//! Helpers shared by the integration tests.
//!
//! Backend suites: SQLite always runs. PostgreSQL and MySQL run when
//! `LETTERBOX_TEST_POSTGRES` / `LETTERBOX_TEST_MYSQL` hold an admin URL
//! (`.ci/run` sets both); each test then gets a throwaway database of its
//! own. When a variable is set, an unreachable server fails the test; when
//! `CI` is set (to anything but `false` or `0`), a missing variable fails
//! it too: a backend suite never passes by skipping.
//!
//! The trust suites ask a real DNS server, dnsmasq ([`dns`]), about
//! records signed by a real signer, dkimpy ([`dkim`]); under CI a missing
//! program fails them the same way.

#![allow(dead_code)]

pub mod daemons;
pub mod db;
pub mod dkim;
pub mod dns;
pub mod dns_server;
pub mod postfix;
pub mod process;
pub mod server;
