//! The byte budget: reservations hold and give back room, stored and
//! in-flight bytes share one bound, an insert converts its reservation, and
//! eviction never touches mail still arriving.

use super::{HOUR, config, msg, subjects};
use crate::config::WhenFull;
use crate::sink::{Reservation, Sink, SinkFull};

/// Holds `n` bytes in a fresh reservation, or says it could not.
fn reserve(sink: &Sink, n: u64) -> Result<Reservation, SinkFull> {
    let mut r = sink.reservation();
    r.grow(n)?;
    Ok(r)
}

#[tokio::test]
async fn a_reservation_holds_room_and_gives_it_back_when_dropped() {
    for mode in [WhenFull::Evict, WhenFull::Refuse] {
        let sink = Sink::new(&config(1000, 10, mode), 1000);
        let mut r = sink.reservation();
        assert_eq!((r.bytes(), sink.in_flight()), (0, 0));
        r.grow(300).unwrap();
        r.grow(200).unwrap();
        let other = reserve(&sink, 100).unwrap();
        assert_eq!(
            (r.bytes(), other.bytes(), sink.in_flight()),
            (500, 100, 600)
        );
        // Held room is not stored mail.
        assert_eq!(sink.usage(), (0, 0));
        drop(r);
        assert_eq!(sink.in_flight(), 100);
        drop(other);
        assert_eq!(sink.in_flight(), 0);
        // All of it is free again.
        let all = reserve(&sink, 1000).unwrap();
        assert_eq!(sink.in_flight(), 1000);
        drop(all);
        assert_eq!(sink.in_flight(), 0);
    }
}

#[tokio::test]
async fn stored_and_in_flight_bytes_share_one_bound() {
    let sink = Sink::new(&config(1000, 10, WhenFull::Refuse), 1000);
    sink.insert("a@x.tmp.example.org", HOUR, msg(1, 600))
        .unwrap();
    let mut r = reserve(&sink, 300).unwrap();
    r.grow(100).unwrap();
    // 600 stored + 400 in flight: not one byte more, and the refused
    // growth changed nothing.
    assert!(r.grow(1).is_err());
    assert_eq!((r.bytes(), sink.in_flight()), (400, 400));
    assert!(!sink.has_room("b@x.tmp.example.org"));
    assert!(
        sink.insert("b@x.tmp.example.org", HOUR, msg(2, 20))
            .is_err()
    );
    assert_eq!(sink.usage(), (600, 1));
    drop(r);
    assert!(sink.has_room("b@x.tmp.example.org"));
    sink.insert("b@x.tmp.example.org", HOUR, msg(2, 400))
        .unwrap();
    assert_eq!(sink.usage(), (1000, 2));
}

#[tokio::test]
async fn inserting_converts_the_reservation_so_the_bytes_count_once() {
    let sink = Sink::new(&config(1000, 10, WhenFull::Refuse), 1000);
    let trace = "Received: from x\r\n";
    let content = msg(1, 900);
    let mut r = reserve(&sink, 900).unwrap();
    // 900 held + an 18-byte trace header: 918 of 1000, not 1818.
    sink.insert_received("a@x.tmp.example.org", HOUR, trace, &content, Some(&mut r))
        .unwrap();
    assert_eq!(r.bytes(), 0);
    assert_eq!(sink.in_flight(), 0);
    assert_eq!(sink.usage(), (918, 1));
    // Dropping the converted reservation gives nothing back twice.
    drop(r);
    assert_eq!((sink.in_flight(), sink.usage()), (0, (918, 1)));

    // A second copy of the same content needs room of its own: two
    // copies are 1836 bytes.
    let sink = Sink::new(&config(1835, 10, WhenFull::Refuse), 1000);
    let mut r = reserve(&sink, 900).unwrap();
    sink.insert_received("a@x.tmp.example.org", HOUR, trace, &content, Some(&mut r))
        .unwrap();
    assert!(
        sink.insert_received("b@x.tmp.example.org", HOUR, trace, &content, Some(&mut r))
            .is_err()
    );
    assert_eq!((sink.in_flight(), sink.usage()), (0, (918, 1)));

    // A reservation larger than the copy keeps the difference until
    // it is dropped.
    let sink = Sink::new(&config(1000, 10, WhenFull::Refuse), 1000);
    let mut r = reserve(&sink, 950).unwrap();
    sink.insert_received(
        "a@x.tmp.example.org",
        HOUR,
        trace,
        &msg(1, 100),
        Some(&mut r),
    )
    .unwrap();
    assert_eq!(
        (r.bytes(), sink.in_flight(), sink.usage()),
        (832, 832, (118, 1))
    );
    drop(r);
    assert_eq!(sink.in_flight(), 0);
}

#[tokio::test]
async fn a_refused_insert_leaves_the_reservation_as_it_was() {
    for mode in [WhenFull::Evict, WhenFull::Refuse] {
        let sink = Sink::new(&config(1000, 10, mode), 1000);
        let _other = reserve(&sink, 500).unwrap();
        let mut r = reserve(&sink, 400).unwrap();
        // The trace header needs 150 more: in flight holds 900 of 1000.
        let trace = "X".repeat(148) + "\r\n";
        assert!(
            sink.insert_received(
                "a@x.tmp.example.org",
                HOUR,
                &trace,
                &msg(1, 400),
                Some(&mut r)
            )
            .is_err(),
            "{mode:?}"
        );
        assert_eq!(
            (r.bytes(), sink.in_flight(), sink.usage()),
            (400, 900, (0, 0))
        );
        drop(r);
        assert_eq!(sink.in_flight(), 500);
    }
}

#[tokio::test]
async fn in_evict_mode_a_reservation_evicts_the_oldest_stored_to_make_room() {
    let sink = Sink::new(&config(1000, 10, WhenFull::Evict), 1000);
    for n in 1..=3 {
        sink.insert("a@x.tmp.example.org", HOUR, msg(n, 300))
            .unwrap();
    }
    let mut r = reserve(&sink, 100).unwrap();
    assert_eq!(sink.usage(), (900, 3));
    // 900 + 100 + 400 > 1000: the two oldest go, the newest stays.
    r.grow(400).unwrap();
    assert_eq!(subjects(&sink, "a@x.tmp.example.org"), ["3"]);
    assert_eq!((sink.in_flight(), sink.usage()), (500, (300, 1)));
    // An insert without a reservation makes room the same way, and
    // never out of what is in flight.
    sink.insert("b@x.tmp.example.org", HOUR, msg(4, 500))
        .unwrap();
    assert_eq!(subjects(&sink, "a@x.tmp.example.org"), Vec::<String>::new());
    assert_eq!((sink.in_flight(), sink.usage()), (500, (500, 1)));
}

#[tokio::test]
async fn in_flight_bytes_alone_filling_the_bound_are_refused_even_in_evict_mode() {
    let sink = Sink::new(&config(1000, 10, WhenFull::Evict), 1000);
    sink.insert("a@x.tmp.example.org", HOUR, msg(1, 100))
        .unwrap();
    let first = reserve(&sink, 800).unwrap();
    // 800 + 300 in flight could never fit: refused, and nothing stored
    // is evicted for it.
    let mut second = reserve(&sink, 100).unwrap();
    assert!(second.grow(200).is_err());
    assert!(reserve(&sink, 201).is_err());
    assert!(
        sink.insert("b@x.tmp.example.org", HOUR, msg(2, 201))
            .is_err()
    );
    assert_eq!((sink.in_flight(), sink.usage()), (900, (100, 1)));
    assert_eq!(subjects(&sink, "a@x.tmp.example.org"), ["1"]);
    // Once the first lets go there is room again.
    drop(first);
    second.grow(200).unwrap();
    assert_eq!((sink.in_flight(), sink.usage()), (300, (100, 1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_receivers_never_cross_the_bound_and_give_everything_back() {
    let sink = Sink::new(&config(2_000, 5, WhenFull::Evict), 1000);
    let mut tasks = Vec::new();
    for t in 0..8 {
        let sink = sink.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..300usize {
                let content = msg(n, 60 + (n * 7 + t) % 90);
                let mut r = sink.reservation();
                let mut refused = false;
                for part in content.chunks(25) {
                    if r.grow(part.len() as u64).is_err() {
                        refused = true;
                        break;
                    }
                    let state = sink.shared.state.lock().unwrap();
                    assert!(state.bytes + state.in_flight <= 2_000);
                }
                if !refused && n % 3 != 0 {
                    let _ = sink.insert_received(
                        &format!("u{}@x.tmp.example.org", (t + n) % 7),
                        HOUR,
                        "Received: x\r\n",
                        &content,
                        Some(&mut r),
                    );
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let state = sink.shared.state.lock().unwrap();
    assert_eq!(state.in_flight, 0);
    let bytes: u64 = state
        .mailboxes
        .values()
        .flatten()
        .map(|m| m.size() as u64)
        .sum();
    assert_eq!(bytes, state.bytes);
    assert!(state.bytes <= 2_000 && !state.order.is_empty());
}
