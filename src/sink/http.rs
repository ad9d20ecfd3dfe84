//! The sink's web page and JSON API (axum).
//!
//! Every `{address}` is normalized with [`Address::from_smtp`] and must
//! resolve to [`Route::Sink`] in the directory: real mailboxes, unknown
//! users and foreign domains all answer 404, so the sink never shows
//! anything but sink mail. There is deliberately no endpoint listing
//! mailboxes.
//!
//! Showing a message parses it, and its HTML is sanitized: that work grows
//! with the message, so every handler hands it to the blocking pool
//! ([`blocking::run`]) and never stalls the runtime worker that serves the
//! SMTP sessions beside it. Nothing is parsed on store, so even a listing
//! line (list, SSE, wait) goes there.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{Stream, StreamExt};
use tokio::sync::broadcast::error::RecvError;

use super::store::Message;
use super::{Sink, Summary};
use crate::address::Address;
use crate::blocking::{self, BlockingError};
use crate::directory::{Directory, Route};

/// The page, with `{{NONCE}}` where each response's CSP nonce goes.
const PAGE: &str = include_str!("page.html");

/// Longest `wait` allowed, whatever `timeout` asks for.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// `wait` without `timeout`.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// The policy of the sanitized HTML document: no script, nothing remote.
pub const HTML_CSP: &str = "sandbox; default-src 'none'; img-src data:";
/// The same with remote images allowed (`?images=1`).
pub const HTML_CSP_IMAGES: &str = "sandbox; default-src 'none'; img-src data: *";
/// Raw sources and attachments: never a live document on our origin.
const DOWNLOAD_CSP: &str = "sandbox; default-src 'none'";

/// What every handler sees.
struct App {
    sink: Sink,
    directory: Directory,
    /// The subaddress delimiter, as the SMTP side resolves with it.
    delimiter: Option<char>,
    /// Sink rules from the config file (normalized pattern, TTL).
    static_rules: Arc<Vec<(String, Duration)>>,
}

type Shared = State<Arc<App>>;

/// An error answer: status and `{"error": "…"}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    fn not_found(what: &str) -> ApiError {
        ApiError(StatusCode::NOT_FOUND, what.to_string())
    }

    fn bad_request(why: impl ToString) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, why.to_string())
    }
}

/// Work handed to the blocking pool that panicked: a bug, logged, and
/// answered 500 like any other API error.
impl From<BlockingError> for ApiError {
    fn from(e: BlockingError) -> ApiError {
        tracing::error!(error = %e, "sink: showing a message failed");
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{} failed", e.what),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl Sink {
    /// The HTTP app. Coverage of an address is decided by the directory
    /// (Route::Sink).
    pub fn router(
        &self,
        directory: Directory,
        delimiter: Option<char>,
        static_rules: Arc<Vec<(String, Duration)>>,
    ) -> Router {
        let app = Arc::new(App {
            sink: self.clone(),
            directory,
            delimiter,
            static_rules,
        });
        let mailbox = "/api/v1/mailbox/{address}";
        Router::new()
            .route("/", get(page))
            .route(mailbox, get(list).delete(clear))
            .route(&format!("{mailbox}/events"), get(events))
            .route(&format!("{mailbox}/wait"), get(wait))
            .route(&format!("{mailbox}/{{id}}"), get(detail).delete(delete))
            .route(&format!("{mailbox}/{{id}}/source"), get(source))
            .route(&format!("{mailbox}/{{id}}/html"), get(html))
            .route(
                &format!("{mailbox}/{{id}}/attachments/{{index}}"),
                get(attachment),
            )
            .fallback(|| async { ApiError::not_found("no such endpoint") })
            .layer(axum::middleware::map_response(common_headers))
            .with_state(app)
    }

    /// Serves `router` on `listener` until `shutdown` is cancelled (axum::serve
    /// with graceful shutdown). Open SSE streams and waits end at shutdown.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        router: Router,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> std::io::Result<()> {
        let closing = self.closing();
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                shutdown.cancelled().await;
                closing.cancel();
            })
            .await
    }
}

/// Headers every answer carries: nothing is cached, sniffed or referred.
async fn common_headers(response: Response) -> Response {
    let mut response = json_errors(response).await;
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

/// axum's own rejections (a path segment that is not UTF-8, a method a
/// route does not have) answer in plain text or with no body; the API
/// answers every error as `{"error": "…"}`, keeping the status (and Allow).
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .ok()
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("error")
                .to_ascii_lowercase()
        });
    let mut out = ApiError(status, text).into_response();
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

/// The sink mailbox named by a path segment, or why not.
async fn mailbox(app: &App, address: &str) -> Result<String, ApiError> {
    let addr = Address::from_smtp(address).map_err(ApiError::bad_request)?;
    let route = app
        .directory
        .resolve(&addr, app.delimiter, &app.static_rules)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "sink: directory lookup failed");
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "directory unavailable".into(),
            )
        })?;
    match *route {
        Route::Sink { .. } => Ok(addr.to_string()),
        _ => Err(ApiError::not_found("no such sink mailbox")),
    }
}

async fn message(app: &App, address: &str, id: &str) -> Result<Arc<Message>, ApiError> {
    let mailbox = mailbox(app, address).await?;
    app.sink
        .get(&mailbox, id)
        .ok_or_else(|| ApiError::not_found("no such message"))
}

/// A message's listing line, parsed on the blocking pool.
async fn summary(m: Arc<Message>) -> Result<Summary, BlockingError> {
    blocking::run("parsing a sink message's summary", move || m.summary()).await
}

fn images(query: &HashMap<String, String>) -> bool {
    query.get("images").is_some_and(|v| v == "1" || v == "true")
}

async fn page() -> Response {
    // A fresh nonce per response: the page's own script and style run, an
    // injected one would not.
    let nonce = format!("{:032x}", rand::random::<u128>());
    let csp = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; \
         frame-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_str(&csp).expect("hex nonce"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    (headers, PAGE.replace("{{NONCE}}", &nonce)).into_response()
}

async fn list(State(app): Shared, Path(address): Path<String>) -> Result<Response, ApiError> {
    let mailbox = mailbox(&app, &address).await?;
    let messages = app.sink.list(&mailbox);
    // One hand-off for the whole listing.
    let summaries = blocking::run("listing a sink mailbox", move || {
        messages.iter().map(|m| m.summary()).collect::<Vec<_>>()
    })
    .await?;
    Ok(Json(summaries).into_response())
}

async fn clear(State(app): Shared, Path(address): Path<String>) -> Result<StatusCode, ApiError> {
    let mailbox = mailbox(&app, &address).await?;
    app.sink.clear(&mailbox);
    Ok(StatusCode::NO_CONTENT)
}

async fn detail(
    State(app): Shared,
    Path((address, id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let m = message(&app, &address, &id).await?;
    let images = images(&q);
    let detail = blocking::run("parsing a sink message", move || m.detail(images)).await?;
    Ok(Json(detail).into_response())
}

async fn delete(
    State(app): Shared,
    Path((address, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let mailbox = mailbox(&app, &address).await?;
    if app.sink.delete(&mailbox, &id) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("no such message"))
    }
}

async fn source(
    State(app): Shared,
    Path((address, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let m = message(&app, &address, &id).await?;
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("message/rfc822"),
        ),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(DOWNLOAD_CSP),
        ),
    ];
    Ok((headers, m.raw()).into_response())
}

async fn html(
    State(app): Shared,
    Path((address, id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let m = message(&app, &address, &id).await?;
    let images = images(&q);
    let body = blocking::run("sanitizing a sink message's HTML", move || m.html(images))
        .await?
        .ok_or_else(|| ApiError::not_found("the message has no HTML body"))?;
    let document = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><meta name=\"referrer\" content=\"no-referrer\"></head><body>{body}</body></html>\n"
    );
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        ),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(if images { HTML_CSP_IMAGES } else { HTML_CSP }),
        ),
    ];
    Ok((headers, document).into_response())
}

async fn attachment(
    State(app): Shared,
    Path((address, id, index)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let m = message(&app, &address, &id).await?;
    let index: usize = index
        .parse()
        .map_err(|_| ApiError::not_found("no such attachment"))?;
    let a = blocking::run("extracting a sink attachment", move || m.attachment(index))
        .await?
        .ok_or_else(|| ApiError::not_found("no such attachment"))?;
    let content_type = HeaderValue::from_str(&a.content_type)
        .ok()
        .filter(|_| is_mime_type(&a.content_type))
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let disposition = content_disposition(a.filename.as_deref().unwrap_or(""));
    let headers = [
        (header::CONTENT_TYPE, content_type),
        (
            header::CONTENT_DISPOSITION,
            HeaderValue::from_str(&disposition).expect("ASCII by construction"),
        ),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(DOWNLOAD_CSP),
        ),
    ];
    Ok((headers, a.contents).into_response())
}

/// `type/subtype` of RFC 6838 restricted-name characters only.
fn is_mime_type(value: &str) -> bool {
    let name = |s: &str| {
        !s.is_empty()
            && s.len() <= 127
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    value
        .split_once('/')
        .is_some_and(|(t, s)| name(t) && name(s))
}

/// `attachment; filename="…"; filename*=UTF-8''…` (RFC 6266): a plain ASCII
/// fallback and the exact (base) name percent-encoded. Path parts, control
/// characters and quotes never reach the header.
pub fn content_disposition(filename: &str) -> String {
    let base = filename.rsplit(['/', '\\']).next().unwrap_or("");
    let base: String = base.chars().filter(|c| !c.is_control()).collect();
    let base = base.trim().trim_start_matches('.').trim();
    let base = if base.is_empty() { "attachment" } else { base };
    let ascii: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " .-_()+,".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::new();
    for b in base.bytes() {
        // RFC 8187 attr-char.
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(b as char);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

/// The summary of each new message of `mailbox`, until shutdown.
fn arrivals(sink: Sink, mailbox: String) -> impl Stream<Item = Arc<Message>> + Send {
    let rx = sink.subscribe();
    futures_util::stream::unfold((rx, sink, mailbox), |(mut rx, sink, mailbox)| async move {
        loop {
            match rx.recv().await {
                Ok(a) if *a.mailbox == *mailbox => {
                    // Gone already (deleted or evicted): nothing to announce.
                    if let Some(m) = sink.get(&mailbox, &a.id) {
                        return Some((m, (rx, sink, mailbox)));
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => tracing::debug!(missed = n, "sink: a listener lagged"),
                Err(RecvError::Closed) => return None,
            }
        }
    })
}

async fn events(State(app): Shared, Path(address): Path<String>) -> Result<Response, ApiError> {
    let mailbox = mailbox(&app, &address).await?;
    // Subscribed before the answer's headers go out: a client that has them
    // will hear of every later message.
    let stream = arrivals(app.sink.clone(), mailbox)
        .take_until(app.sink.closing().cancelled_owned())
        .then(|m| async move {
            let id = m.id.clone();
            let event = match summary(m).await {
                Ok(summary) => Event::default()
                    .event("message")
                    .id(id)
                    .json_data(summary)
                    .unwrap_or_else(|_| Event::default()),
                // An event without data, which clients ignore, as for a
                // summary that does not serialize.
                Err(e) => {
                    tracing::error!(error = %e, "sink: announcing a message failed");
                    Event::default()
                }
            };
            Ok::<_, Infallible>(event)
        });
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    // Tell buffering proxies to pass events straight through.
    response.headers_mut().insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    Ok(response)
}

/// `?timeout=` in seconds (fractions allowed), capped at [`MAX_WAIT`].
fn wait_timeout(query: &HashMap<String, String>) -> Result<Duration, ApiError> {
    let Some(value) = query.get("timeout") else {
        return Ok(DEFAULT_WAIT);
    };
    let secs: f64 = value
        .trim()
        .parse()
        .map_err(|_| ApiError::bad_request("timeout must be a number of seconds"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(ApiError::bad_request("timeout must be a number of seconds"));
    }
    Ok(Duration::from_secs_f64(secs.min(MAX_WAIT.as_secs_f64())))
}

/// Blocks until the next message for the mailbox and answers its summary;
/// 204 on timeout. With `?after=<id>`, a message that arrived after `<id>`
/// and is already held answers at once, so a script cannot miss a mail
/// that came between two calls.
async fn wait(
    State(app): Shared,
    Path(address): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let timeout = wait_timeout(&q)?;
    let mailbox = mailbox(&app, &address).await?;
    let mut arrivals = Box::pin(arrivals(app.sink.clone(), mailbox.clone()));
    if let Some(next) = q
        .get("after")
        .and_then(|after| app.sink.next_after(&mailbox, after))
    {
        return Ok(Json(summary(next).await?).into_response());
    }
    let closing = app.sink.closing();
    tokio::select! {
        next = tokio::time::timeout(timeout, arrivals.next()) => match next {
            Ok(Some(m)) => Ok(Json(summary(m).await?).into_response()),
            _ => Ok(StatusCode::NO_CONTENT.into_response()),
        },
        _ = closing.cancelled() => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_disposition_is_safe() {
        assert_eq!(
            content_disposition("report.pdf"),
            "attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf"
        );
        assert_eq!(
            content_disposition("../../etc/pass\"wd\r\n.txt"),
            "attachment; filename=\"pass_wd.txt\"; filename*=UTF-8''pass%22wd.txt"
        );
        assert_eq!(
            content_disposition("Grüße; x=1.txt"),
            "attachment; filename=\"Gr__e_ x_1.txt\"; filename*=UTF-8''Gr%C3%BC%C3%9Fe%3B%20x%3D1.txt"
        );
        assert_eq!(
            content_disposition("C:\\x\\..."),
            "attachment; filename=\"attachment\"; filename*=UTF-8''attachment"
        );
        assert_eq!(
            content_disposition(""),
            "attachment; filename=\"attachment\"; filename*=UTF-8''attachment"
        );
    }

    #[test]
    fn mime_types() {
        assert!(is_mime_type("image/png"));
        assert!(is_mime_type("application/vnd.ms-excel"));
        assert!(!is_mime_type("text/html; charset=x"));
        assert!(!is_mime_type("text"));
    }

    #[tokio::test]
    async fn work_that_panicked_on_the_blocking_pool_answers_500_json() {
        let e = blocking::run("parsing a sink message", || -> u8 { panic!("bug") })
            .await
            .unwrap_err();
        let r = ApiError::from(e).into_response();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(r.into_body(), 4096).await.unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
            serde_json::json!({"error": "parsing a sink message failed"})
        );
    }

    #[test]
    fn wait_timeouts() {
        let q = |v: &str| HashMap::from([("timeout".to_string(), v.to_string())]);
        assert_eq!(wait_timeout(&HashMap::new()).unwrap(), DEFAULT_WAIT);
        assert_eq!(wait_timeout(&q("1")).unwrap(), Duration::from_secs(1));
        assert_eq!(wait_timeout(&q("0.5")).unwrap(), Duration::from_millis(500));
        assert_eq!(wait_timeout(&q("100000")).unwrap(), MAX_WAIT);
        for bad in ["", "x", "-1", "NaN", "inf"] {
            assert_eq!(
                wait_timeout(&q(bad)).unwrap_err().0,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
    }
}
