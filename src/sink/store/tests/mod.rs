//! The store's unit tests, a file for each part of the store they pin:
//! [`store`] inserting, the bounds' eviction and refusal, lookups and
//! removal; [`budget`] reservations and the one byte bound; [`expiry`] the
//! purge task. Here: what they share to build a store and its messages.

mod budget;
mod expiry;
mod store;

use std::time::Duration;

use bytes::Bytes;

use super::Sink;
use crate::config::{SinkConfig, WhenFull};
use crate::units::ByteSize;

fn config(max_bytes: u64, per_mailbox: usize, when_full: WhenFull) -> SinkConfig {
    SinkConfig {
        max_bytes: ByteSize(max_bytes),
        max_messages_per_mailbox: per_mailbox,
        when_full,
        ..SinkConfig::default()
    }
}

fn msg(n: usize, len: usize) -> Bytes {
    let head = format!("Subject: {n}\r\n\r\n");
    let mut v = head.into_bytes();
    v.resize(len.max(v.len()), b'x');
    Bytes::from(v)
}

fn subjects(sink: &Sink, mailbox: &str) -> Vec<String> {
    sink.list(mailbox)
        .iter()
        .map(|m| {
            String::from_utf8_lossy(&m.raw()[9..])
                .split('\r')
                .next()
                .unwrap()
                .to_string()
        })
        .collect()
}

const HOUR: Duration = Duration::from_secs(3600);
