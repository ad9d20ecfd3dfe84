//! The milter client against the real programs: a private rspamd in milter
//! mode (rejects GTUBE with its own reply, adds its headers to clean mail),
//! a private OpenDKIM signing over TCP and over a UNIX socket (the
//! signature verified by dkimpy), and milters that are down or hang, which
//! must give typed errors within the timeout.
//!
//! See tests/common/daemons.rs for each daemon's configuration.

mod common;

use std::time::{Duration, Instant};

use common::daemons::{self, DkimSocket};
use letterbox::milter::{
    ConnectInfo, HeloInfo, MailInfo, Milter, MilterError, Modification, ProtocolFlags, RcptInfo,
    Response,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A session from 192.0.2.10 (or `client`) to mx.example.org.
fn connect_info(client: &str) -> ConnectInfo {
    ConnectInfo {
        hostname: "mx.example.org".into(),
        daemon_name: "letterbox".into(),
        local: Some("127.0.0.1:25".parse().unwrap()),
        client: Some(format!("{client}:40000").parse().unwrap()),
        client_name: Some("client.example.net".into()),
        client_ptr: Some("client.example.net".into()),
    }
}

/// Connect, HELO, MAIL, one RCPT and DATA, each answered Continue.
async fn envelope(m: &mut Milter, client: &str, from: &str, queue_id: &str) {
    assert_eq!(
        m.connect_info(&connect_info(client)).await.unwrap(),
        Response::Continue
    );
    assert_eq!(
        m.helo(&HeloInfo {
            name: "client.example.net".into(),
            tls: None
        })
        .await
        .unwrap(),
        Response::Continue
    );
    start_message(m, from, queue_id).await;
}

async fn start_message(m: &mut Milter, from: &str, queue_id: &str) {
    let mail = MailInfo {
        sender: from.into(),
        args: vec![],
        queue_id: queue_id.into(),
        auth: None,
    };
    assert_eq!(m.mail(&mail).await.unwrap(), Response::Continue);
    let rcpt = RcptInfo {
        recipient: "alice@example.org".into(),
        args: vec![],
    };
    assert_eq!(m.rcpt(&rcpt).await.unwrap(), Response::Continue);
    assert_eq!(m.data().await.unwrap(), Response::Continue);
}

const GTUBE: &str = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X";

fn message(from: &str, subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Sender <{from}>\r\n\
         To: Alice <alice@example.org>\r\n\
         Subject: {subject}\r\n\
         Date: Mon, 07 Dec 2026 10:00:00 +0000\r\n\
         Message-ID: <{subject}@example.net>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         {body}\r\n"
    )
    .into_bytes()
}

/// Applies header edits the way letterbox will: the field is
/// `name:value` (the value keeps its leading space and CRLF folds).
fn apply_headers(raw: &[u8], mods: &[Modification]) -> Vec<u8> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 2;
    let mut fields: Vec<String> = Vec::new();
    for line in String::from_utf8_lossy(&raw[..split]).split_inclusive("\r\n") {
        if line.starts_with([' ', '\t']) {
            fields.last_mut().unwrap().push_str(line);
        } else {
            fields.push(line.to_string());
        }
    }
    for m in mods {
        match m {
            Modification::AddHeader { name, value } => fields.push(format!("{name}:{value}\r\n")),
            Modification::InsertHeader { index, name, value } => {
                let at = (*index as usize).min(fields.len());
                fields.insert(at, format!("{name}:{value}\r\n"));
            }
            _ => {}
        }
    }
    let mut out = fields.concat().into_bytes();
    out.extend_from_slice(&raw[split..]);
    out
}

#[test]
fn rspamd_rejects_gtube_and_adds_its_headers_to_clean_mail() {
    let Some(rspamd) = daemons::rspamd() else {
        return;
    };
    let address = format!("inet:{}", rspamd.addr);
    runtime().block_on(async {
        let mut m = Milter::connect(&address, Duration::from_secs(30))
            .await
            .unwrap();
        let n = m.negotiation().clone();
        assert_eq!(n.version, 6);
        // rspamd answers only at the end of the message.
        assert!(
            n.protocol
                .has(ProtocolFlags::NR_CONNECT | ProtocolFlags::NR_RCPT)
        );

        // The first message carries GTUBE: rspamd refuses it with its
        // own reply.
        envelope(&mut m, "192.0.2.10", "spammer@example.net", "GTUBE1").await;
        let start = Instant::now();
        let eom = m
            .message(&message("spammer@example.net", "gtube", GTUBE))
            .await
            .unwrap();
        eprintln!("GTUBE: {eom:?} in {:?}", start.elapsed());
        let Response::ReplyCode(reply) = &eom.response else {
            panic!(
                "GTUBE was not refused with a reply: {eom:?}\n{}",
                rspamd.daemon.log()
            );
        };
        assert_eq!(reply.code, 554, "{reply:?}");
        assert_eq!(reply.enhanced.as_deref(), Some("5.7.1"), "{reply:?}");
        assert_eq!(reply.text, "Gtube pattern", "{reply:?}");
        assert!(eom.modifications.is_empty());

        // A clean message on the same connection, after the refusal:
        // accepted, with rspamd's headers to add.
        m.abort().await.unwrap();
        start_message(&mut m, "bob@example.net", "CLEAN1").await;
        let start = Instant::now();
        let eom = m
            .message(&message(
                "bob@example.net",
                "lunch",
                "Shall we meet for lunch on Tuesday at noon?",
            ))
            .await
            .unwrap();
        eprintln!("clean: {eom:#?} in {:?}", start.elapsed());
        assert!(
            matches!(eom.response, Response::Continue | Response::Accept),
            "{eom:?}"
        );
        let added = |want: &str| {
            eom.modifications.iter().find_map(|m| match m {
                Modification::AddHeader { name, value }
                | Modification::InsertHeader { name, value, .. }
                    if name.eq_ignore_ascii_case(want) =>
                {
                    Some(value.clone())
                }
                _ => None,
            })
        };
        let result = added("X-Spamd-Result").expect("X-Spamd-Result added");
        assert!(result.starts_with(" default: False ["), "{result:?}");
        let queue_id = added("X-Rspamd-Queue-Id").expect("X-Rspamd-Queue-Id added");
        assert_eq!(queue_id, " CLEAN1", "rspamd read the i macro");
        let server = added("X-Rspamd-Server").expect("X-Rspamd-Server added");
        assert!(!server.trim().is_empty());
        assert!(added("X-Spam").is_none(), "a clean message is not marked");
        m.quit().await.unwrap();
    });
}

/// Signs one message through the OpenDKIM at `address` and checks the
/// signature with dkimpy.
fn dkim_signs(socket: DkimSocket) {
    let (Some(python), Some(dkim)) = (daemons::dkimpy(), daemons::opendkim(socket)) else {
        return;
    };
    runtime().block_on(async {
        let mut m = Milter::connect(&dkim.address, Duration::from_secs(10))
            .await
            .unwrap();
        // Mail from an internal host (127.0.0.1) in the signing domain.
        eprintln!("OpenDKIM negotiated {:?}", m.negotiation());
        envelope(&mut m, "127.0.0.1", "bob@example.org", "DKIM1").await;
        let raw = message(
            "bob@example.org",
            "signed",
            "This message is signed.\r\nIt has two lines.",
        );
        let eom = m.message(&raw).await.unwrap();
        assert!(
            matches!(eom.response, Response::Continue | Response::Accept),
            "{eom:?}\n{}",
            dkim.daemon.log()
        );
        let sigs: Vec<&Modification> = eom
            .modifications
            .iter()
            .filter(|m| {
                matches!(m,
                    Modification::AddHeader { name, .. } | Modification::InsertHeader { name, .. }
                    if name == "DKIM-Signature")
            })
            .collect();
        assert_eq!(sigs.len(), 1, "{eom:#?}\n{}", dkim.daemon.log());
        let signed = apply_headers(&raw, &eom.modifications);
        eprintln!("{}", String::from_utf8_lossy(&signed));
        let (ok, out) = daemons::dkimpy_verify(&python, &signed, &dkim.public_txt);
        assert!(ok, "dkimpy: {out}");

        // The same signature does not fit a changed body.
        let tampered = String::from_utf8(signed)
            .unwrap()
            .replace("two lines", "2 lines");
        let (ok, _) = daemons::dkimpy_verify(&python, tampered.as_bytes(), &dkim.public_txt);
        assert!(!ok, "a tampered message must not verify");
        m.quit().await.unwrap();
    });
}

#[test]
fn opendkim_signs_over_tcp_and_dkimpy_verifies() {
    dkim_signs(DkimSocket::Tcp);
}

#[test]
fn opendkim_signs_over_a_unix_socket_and_dkimpy_verifies() {
    dkim_signs(DkimSocket::Unix);
}

#[test]
fn a_milter_that_is_down_is_a_connect_error() {
    runtime().block_on(async {
        let port = daemons::free_port();
        let start = Instant::now();
        let e = Milter::connect(&format!("inet:127.0.0.1:{port}"), Duration::from_secs(5))
            .await
            .unwrap_err();
        match &e {
            MilterError::Connect { source, .. } => {
                assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused)
            }
            other => panic!("{other}"),
        }
        assert!(start.elapsed() < Duration::from_secs(5));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nothing.sock");
        let e = Milter::connect(&format!("unix:{}", path.display()), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, MilterError::Connect { .. }), "{e}");

        let e = Milter::connect("inet:nowhere", Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, MilterError::Address(_)), "{e}");
    });
}

#[test]
fn a_milter_that_hangs_times_out() {
    // Listening, so connect succeeds, but never answering: the kernel
    // completes the handshake on its own.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("inet:{}", listener.local_addr().unwrap());
    runtime().block_on(async {
        let timeout = Duration::from_millis(500);
        let start = Instant::now();
        let e = Milter::connect(&address, timeout).await.unwrap_err();
        let took = start.elapsed();
        assert!(
            matches!(
                e,
                MilterError::Timeout {
                    during: "negotiation",
                    ..
                }
            ),
            "{e}"
        );
        assert!(took >= timeout && took < timeout * 4, "{took:?}");
    });
    drop(listener);
}
