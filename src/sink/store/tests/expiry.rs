//! Expiry: messages go on time with no traffic, and the purge task stops
//! with the last handle.

use std::sync::Arc;
use std::time::Duration;

use super::{config, msg, subjects};
use crate::config::WhenFull;
use crate::sink::Sink;

#[tokio::test(start_paused = true)]
async fn expired_messages_go_without_traffic() {
    let sink = Sink::new(&config(1 << 20, 10, WhenFull::Evict), 1000);
    sink.insert("a@x.tmp.example.org", Duration::from_secs(60), msg(1, 20))
        .unwrap();
    sink.insert("a@x.tmp.example.org", Duration::from_secs(10), msg(2, 20))
        .unwrap();
    sink.insert("b@x.tmp.example.org", Duration::from_secs(30), msg(3, 20))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(9_999)).await;
    assert_eq!(sink.usage(), (60, 3));
    tokio::time::sleep(Duration::from_millis(2)).await;
    assert_eq!(subjects(&sink, "a@x.tmp.example.org"), ["1"]);
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(sink.usage(), (20, 1));
    assert!(sink.list("b@x.tmp.example.org").is_empty());
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(sink.usage(), (0, 0));
    let state = sink.shared.state.lock().unwrap();
    assert!(state.mailboxes.is_empty() && state.order.is_empty() && state.expirations.is_empty());
}

#[tokio::test(start_paused = true)]
async fn purge_task_stops_with_the_last_handle() {
    let sink = Sink::new(&config(1 << 20, 10, WhenFull::Evict), 1000);
    let shared = Arc::downgrade(&sink.shared);
    let clone = sink.clone();
    drop(sink);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(shared.upgrade().is_some(), "a clone still holds the store");
    drop(clone);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        shared.upgrade().is_none(),
        "the purge task let go of the store"
    );
}
