//! The policy client against the real postgrey, run privately (see
//! tests/common/daemons.rs): a new triplet is greylisted with postgrey's
//! own text, the retry after the delay passes with postgrey's header, over
//! TCP and over a UNIX socket; a server that is down or hangs gives a
//! typed error within the timeout.

mod common;

use std::time::{Duration, Instant};

use common::daemons;
use letterbox::policy::{Action, PolicyClient, PolicyError, PolicyRequest, ProtocolState};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The RCPT-stage request Postfix would send for this triplet.
fn rcpt(client: &str, sender: &str, recipient: &str) -> PolicyRequest {
    PolicyRequest {
        protocol_state: ProtocolState::Rcpt,
        protocol_name: "ESMTP".into(),
        helo_name: "client.example.net".into(),
        queue_id: "Q1".into(),
        sender: sender.into(),
        recipient: recipient.into(),
        client_address: Some(client.parse().unwrap()),
        client_port: Some(40000),
        client_name: Some("client.example.net".into()),
        reverse_client_name: Some("client.example.net".into()),
        instance: "Q1.1".into(),
        server_address: Some("127.0.0.1".parse().unwrap()),
        server_port: Some(25),
        ..Default::default()
    }
}

/// The first request for a triplet is greylisted, the retry after the
/// delay passes; other triplets stay greylisted. All on one client, so
/// the connection is reused.
fn greylists_then_passes(unix: bool) {
    let Some(postgrey) = daemons::postgrey(unix) else {
        return;
    };
    runtime().block_on(async {
        let client = PolicyClient::new(&postgrey.address, Duration::from_secs(10)).unwrap();
        let first = rcpt("192.0.2.7", "bob@example.net", "alice@example.org");
        let start = Instant::now();
        let action = client.check(&first).await.unwrap();
        eprintln!("first: {action:?} in {:?}", start.elapsed());
        let Action::DeferIfPermit(reply) = &action else {
            panic!(
                "a new triplet is greylisted: {action:?}\n{}",
                postgrey.daemon.log()
            );
        };
        assert_eq!(reply.code, 450);
        // postgrey says 4.2.0 (not Postfix's default 4.7.1) to any client
        // that sends etrn_domain, as Postfix 2.3 and later (and we) do.
        assert_eq!(reply.enhanced, "4.2.0");
        assert_eq!(
            reply.text,
            "Greylisted, see http://postgrey.schweikert.ch/help/example.org.html"
        );

        // Too early (postgrey counts whole seconds, hence a 2 s delay):
        // still greylisted.
        let again = client.check(&first).await.unwrap();
        assert!(matches!(again, Action::DeferIfPermit(_)), "{again:?}");

        // The client's retry, a new delivery attempt (a new instance),
        // after the delay: it passes, and postgrey asks for its header.
        tokio::time::sleep(daemons::POSTGREY_DELAY + Duration::from_millis(1100)).await;
        let retry = PolicyRequest {
            queue_id: "Q2".into(),
            instance: "Q2.1".into(),
            ..first.clone()
        };
        let start = Instant::now();
        let action = client.check(&retry).await.unwrap();
        eprintln!("retry: {action:?} in {:?}", start.elapsed());
        let Action::Prepend(header) = &action else {
            panic!("the retry passes: {action:?}\n{}", postgrey.daemon.log());
        };
        assert!(header.starts_with("X-Greylist: delayed "), "{header}");
        assert!(header.contains(" seconds by postgrey-"), "{header}");
        assert!(header.contains(" at policy.test; "), "{header}");

        // The header is asked for once per delivery attempt: asking again
        // within the same instance just passes.
        assert_eq!(client.check(&retry).await.unwrap(), Action::Dunno);

        // Another sender from the same client is a new triplet.
        let other = rcpt("192.0.2.7", "carol@example.net", "alice@example.org");
        let action = client.check(&other).await.unwrap();
        assert!(matches!(action, Action::DeferIfPermit(_)), "{action:?}");
    });
}

#[test]
fn postgrey_greylists_then_lets_the_retry_through() {
    greylists_then_passes(false);
}

#[test]
fn postgrey_over_a_unix_socket() {
    greylists_then_passes(true);
}

#[test]
fn a_policy_server_that_is_down_is_a_connect_error() {
    runtime().block_on(async {
        let port = daemons::free_port();
        let client =
            PolicyClient::new(&format!("inet:127.0.0.1:{port}"), Duration::from_secs(5)).unwrap();
        let start = Instant::now();
        let e = client
            .check(&rcpt("192.0.2.7", "a@example.net", "b@example.org"))
            .await
            .unwrap_err();
        match &e {
            PolicyError::Connect { source, .. } => {
                assert_eq!(source.kind(), std::io::ErrorKind::ConnectionRefused)
            }
            other => panic!("{other}"),
        }
        assert!(start.elapsed() < Duration::from_secs(5));

        let dir = tempfile::tempdir().unwrap();
        let client = PolicyClient::new(
            &format!("unix:{}", dir.path().join("none.sock").display()),
            Duration::from_secs(5),
        )
        .unwrap();
        let e = client.check(&PolicyRequest::default()).await.unwrap_err();
        assert!(matches!(e, PolicyError::Connect { .. }), "{e}");

        assert!(matches!(
            PolicyClient::new("127.0.0.1:10023", Duration::from_secs(1)),
            Err(PolicyError::Address(_))
        ));
    });
}

#[test]
fn a_policy_server_that_hangs_times_out() {
    // Listening (the kernel completes the handshake) but never answering.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("inet:{}", listener.local_addr().unwrap());
    runtime().block_on(async {
        let timeout = Duration::from_millis(500);
        let client = PolicyClient::new(&address, timeout).unwrap();
        let start = Instant::now();
        let e = client
            .check(&rcpt("192.0.2.7", "a@example.net", "b@example.org"))
            .await
            .unwrap_err();
        let took = start.elapsed();
        assert!(matches!(e, PolicyError::Timeout { .. }), "{e}");
        assert!(took >= timeout && took < timeout * 4, "{took:?}");
    });
    drop(listener);
}
