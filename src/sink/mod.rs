//! The ephemeral catch-all sink: recipients that match a sink rule land in
//! a bounded in-memory store instead of a maildir, are shown on a small web
//! page and JSON API for a while, then forgotten. No byte of a sink message
//! ever touches the disk.
//!
//! - [`store`]: the bounded store, its limits and the expiry task.
//! - [`message`]: parsing on demand into the API's summary and detail.
//! - [`sanitize`]: the HTML policy and remote-image blocking.
//! - [`http`]: the axum router, handlers and the page (`page.html`).

pub mod http;
pub mod message;
pub mod sanitize;
pub mod store;

pub use message::{Attachment, Detail, Header, Summary};
pub use store::{Message, Reservation, Sink, SinkFull};
