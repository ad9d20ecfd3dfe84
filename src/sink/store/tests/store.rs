//! Inserting and the bounds that evict or refuse, content shared between
//! copies, ids, lookups and removal, and the books under concurrent writers.

use std::collections::VecDeque;

use super::{HOUR, config, msg, subjects};
use crate::config::WhenFull;
use crate::sink::Sink;

#[tokio::test]
async fn global_byte_cap_evicts_the_globally_oldest() {
    let sink = Sink::new(&config(300, 100, WhenFull::Evict), 1000);
    sink.insert("a@x.tmp.example.org", HOUR, msg(1, 100))
        .unwrap();
    sink.insert("b@x.tmp.example.org", HOUR, msg(2, 100))
        .unwrap();
    sink.insert("a@x.tmp.example.org", HOUR, msg(3, 100))
        .unwrap();
    assert_eq!(sink.usage(), (300, 3));
    sink.insert("b@x.tmp.example.org", HOUR, msg(4, 150))
        .unwrap();
    // 1 and 2 had to go (100 + 150 > 300 - 100 after only one).
    assert_eq!(sink.usage(), (250, 2));
    assert_eq!(subjects(&sink, "a@x.tmp.example.org"), ["3"]);
    assert_eq!(subjects(&sink, "b@x.tmp.example.org"), ["4"]);
    // The emptied mailbox is gone, not an empty entry.
    assert_eq!(sink.shared.state.lock().unwrap().mailboxes.len(), 2);
}

#[tokio::test]
async fn per_mailbox_cap_evicts_that_mailboxs_oldest() {
    let sink = Sink::new(&config(1 << 20, 2, WhenFull::Evict), 1000);
    sink.insert("other@x.tmp.example.org", HOUR, msg(0, 50))
        .unwrap();
    for n in 1..=3 {
        sink.insert("a@x.tmp.example.org", HOUR, msg(n, 50))
            .unwrap();
    }
    assert_eq!(subjects(&sink, "a@x.tmp.example.org"), ["3", "2"]);
    assert_eq!(subjects(&sink, "other@x.tmp.example.org"), ["0"]);
    assert_eq!(sink.usage(), (150, 3));
}

#[tokio::test]
async fn message_size_cap_refuses_in_both_modes() {
    for mode in [WhenFull::Evict, WhenFull::Refuse] {
        let sink = Sink::new(&config(1 << 20, 10, mode), 100);
        sink.insert("a@x.tmp.example.org", HOUR, msg(1, 100))
            .unwrap();
        assert!(
            sink.insert("a@x.tmp.example.org", HOUR, msg(2, 101))
                .is_err()
        );
        assert_eq!(sink.usage(), (100, 1));
    }
    // Larger than the whole store: refused rather than emptying it.
    let sink = Sink::new(&config(150, 10, WhenFull::Evict), 1000);
    sink.insert("a@x.tmp.example.org", HOUR, msg(1, 100))
        .unwrap();
    assert!(
        sink.insert("a@x.tmp.example.org", HOUR, msg(2, 151))
            .is_err()
    );
    assert_eq!(sink.usage(), (100, 1));
}

#[tokio::test]
async fn copies_of_one_transaction_share_its_content() {
    let sink = Sink::new(&config(1 << 20, 10, WhenFull::Evict), 1000);
    let content = msg(1, 300);
    for (mailbox, trace) in [
        ("a@x.tmp.example.org", "Received: a\r\n"),
        ("b@x.tmp.example.org", "Received: b\r\n"),
    ] {
        sink.insert_received(mailbox, HOUR, trace, &content, None)
            .unwrap();
    }
    let a = sink.list("a@x.tmp.example.org").remove(0);
    let b = sink.list("b@x.tmp.example.org").remove(0);
    // One buffer for both copies, each with its own trace header.
    assert_eq!(a.content.as_ptr(), content.as_ptr());
    assert_eq!(b.content.as_ptr(), content.as_ptr());
    assert_eq!(a.raw(), [&b"Received: a\r\n"[..], &content].concat());
    assert_eq!(b.raw(), [&b"Received: b\r\n"[..], &content].concat());
    // The bound still counts each copy in full.
    assert_eq!(sink.usage(), (2 * (13 + 300), 2));
}

#[tokio::test]
async fn the_size_limit_counts_received_content_not_our_trace_header() {
    let sink = Sink::new(&config(1 << 20, 10, WhenFull::Evict), 100);
    let trace = "Received: from x\r\n";
    sink.insert_received("a@x.tmp.example.org", HOUR, trace, &msg(1, 100), None)
        .unwrap();
    assert!(
        sink.insert_received("a@x.tmp.example.org", HOUR, trace, &msg(2, 101), None)
            .is_err()
    );
    let stored = sink.list("a@x.tmp.example.org");
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].size(), trace.len() + 100);
    assert!(
        stored[0]
            .raw()
            .starts_with(b"Received: from x\r\nSubject: 1\r\n")
    );
    // The store's byte bound still counts the whole copy.
    let sink = Sink::new(&config(110, 10, WhenFull::Evict), 100);
    assert!(
        sink.insert_received("a@x.tmp.example.org", HOUR, trace, &msg(1, 100), None)
            .is_err()
    );
    assert_eq!(sink.usage(), (0, 0));
}

#[tokio::test]
async fn refuse_mode_refuses_at_each_bound() {
    let sink = Sink::new(&config(250, 2, WhenFull::Refuse), 1000);
    assert!(sink.has_room("a@x.tmp.example.org"));
    sink.insert("a@x.tmp.example.org", HOUR, msg(1, 100))
        .unwrap();
    sink.insert("a@x.tmp.example.org", HOUR, msg(2, 100))
        .unwrap();
    assert!(!sink.has_room("a@x.tmp.example.org"));
    assert!(!sink.has_room("A@X.tmp.example.org"));
    assert!(
        sink.insert("a@x.tmp.example.org", HOUR, msg(3, 10))
            .is_err()
    );
    // Another mailbox still fits under the byte cap, but not over it.
    assert!(sink.has_room("b@x.tmp.example.org"));
    assert!(
        sink.insert("b@x.tmp.example.org", HOUR, msg(4, 51))
            .is_err()
    );
    sink.insert("b@x.tmp.example.org", HOUR, msg(5, 50))
        .unwrap();
    assert!(!sink.has_room("c@x.tmp.example.org"));
    assert_eq!(sink.usage(), (250, 3));
    assert_eq!(subjects(&sink, "a@x.tmp.example.org"), ["2", "1"]);
}

#[tokio::test]
async fn ids_are_unique_hex() {
    let sink = Sink::new(&config(1 << 30, 10_000, WhenFull::Evict), 1000);
    for n in 0..5000 {
        sink.insert("a@x.tmp.example.org", HOUR, msg(n, 10))
            .unwrap();
    }
    let list = sink.list("a@x.tmp.example.org");
    let ids: std::collections::HashSet<_> = list.iter().map(|m| m.id.clone()).collect();
    assert_eq!(ids.len(), 5000);
    assert!(ids.iter().all(|id| {
        id.len() == 16
            && id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    }));
}

#[tokio::test]
async fn delete_and_clear_free_everything() {
    let sink = Sink::new(&config(1 << 20, 10, WhenFull::Evict), 1000);
    sink.insert("a@x.tmp.example.org", HOUR, msg(1, 20))
        .unwrap();
    sink.insert("a@x.tmp.example.org", HOUR, msg(2, 30))
        .unwrap();
    sink.insert("b@x.tmp.example.org", HOUR, msg(3, 40))
        .unwrap();
    let id = sink.list("a@x.tmp.example.org")[0].id.clone();
    assert!(sink.delete("a@x.tmp.example.org", &id));
    assert!(!sink.delete("a@x.tmp.example.org", &id));
    assert!(!sink.delete(
        "b@x.tmp.example.org",
        &sink.list("a@x.tmp.example.org")[0].id
    ));
    assert_eq!(sink.usage(), (60, 2));
    sink.clear("a@x.tmp.example.org");
    assert_eq!(sink.usage(), (40, 1));
    let state = sink.shared.state.lock().unwrap();
    assert_eq!(state.mailboxes.len(), 1);
    assert_eq!(state.expirations.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_writers_keep_the_books_straight() {
    let sink = Sink::new(&config(10_000, 5, WhenFull::Evict), 1000);
    let mut tasks = Vec::new();
    for t in 0..8 {
        let sink = sink.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..500 {
                sink.insert(
                    &format!("u{}@x.tmp.example.org", (t + n) % 13),
                    HOUR,
                    msg(n, 37 + n % 50),
                )
                .unwrap();
                let _ = sink.list(&format!("u{}@x.tmp.example.org", n % 13));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let state = sink.shared.state.lock().unwrap();
    let bytes: u64 = state
        .mailboxes
        .values()
        .flatten()
        .map(|m| m.size() as u64)
        .sum();
    assert_eq!(bytes, state.bytes);
    assert!(state.bytes <= 10_000);
    assert!(
        state
            .mailboxes
            .values()
            .all(|q| q.len() <= 5 && !q.is_empty())
    );
    assert_eq!(state.order.len(), state.expirations.len());
    assert_eq!(
        state.order.len(),
        state.mailboxes.values().map(VecDeque::len).sum::<usize>()
    );
}
