//! DKIM: `letterbox dkim keygen|dns|list|remove` as the real binary (exact
//! output, the record's shape), and signatures on mail submitted over 587
//! verified by dkimpy against the records the CLI printed, for RSA and
//! Ed25519 side by side. No DNS: dkimpy's lookup is handed the records.

mod common;

use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use common::server::{Client, TestServer};
use tokio::net::TcpStream;

/// The binary with `url` as its database and nothing else from outside.
fn letterbox(url: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_letterbox"));
    for (k, _) in std::env::vars() {
        if k.starts_with("LETTERBOX_") {
            c.env_remove(k);
        }
    }
    c.env("LETTERBOX_DATABASE__URL", url)
        .env_remove("RUST_LOG")
        .args(args)
        .stdin(Stdio::null());
    c
}

fn out(o: Output) -> (bool, String, String) {
    (
        o.status.success(),
        String::from_utf8(o.stdout).unwrap(),
        String::from_utf8(o.stderr).unwrap(),
    )
}

fn ok(url: &str, args: &[&str]) -> String {
    let (success, stdout, stderr) = out(letterbox(url, args).output().unwrap());
    assert!(success && stderr.is_empty(), "{args:?}: {stderr}");
    stdout
}

fn fails(url: &str, args: &[&str]) -> String {
    let (success, stdout, stderr) = out(letterbox(url, args).output().unwrap());
    assert!(!success, "{args:?} succeeded: {stdout}");
    assert_eq!(stdout, "", "{args:?}");
    stderr
}

fn is_base64(s: &str) -> bool {
    !s.is_empty() && STANDARD.decode(s).is_ok()
}

/// Checks a zone-file line exactly, the key aside: `NAME. IN TXT "…" …`
/// with strings of at most 255 bytes; returns the joined TXT value.
fn record(line: &str, selector: &str, domain: &str, k: &str, key_len: usize) -> String {
    let prefix = format!("{selector}._domainkey.{domain}. IN TXT \"");
    let strings = line
        .strip_prefix(&prefix)
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or_else(|| panic!("not a record for {selector}: {line}"));
    let parts: Vec<&str> = strings.split("\" \"").collect();
    assert!(
        parts.iter().all(|p| p.len() <= 255 && !p.contains('"')),
        "{line}"
    );
    assert!(
        parts[..parts.len() - 1].iter().all(|p| p.len() == 255),
        "{line}"
    );
    let value = parts.concat();
    let key = value
        .strip_prefix(&format!("v=DKIM1; k={k}; p="))
        .unwrap_or_else(|| panic!("{value}"));
    assert!(is_base64(key) && key.len() == key_len, "{key}");
    value
}

#[test]
fn dkim_commands() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    ok(&url, &["domain", "add", "example.org"]);
    assert_eq!(ok(&url, &["dkim", "list"]), "");
    assert_eq!(ok(&url, &["dkim", "list", "--json"]), "[]\n");

    // RSA 2048 by default, under a dated selector: an SPKI of 294 bytes
    // is 392 base64 characters, cut into two strings.
    let today = chrono::Utc::now().format("%Y%m%d").to_string();
    let rsa_sel = format!("{today}-rsa");
    let stdout = ok(&url, &["dkim", "keygen", "Example.ORG"]);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(
        lines[0],
        format!(
            "; added DKIM key {rsa_sel} of example.org (rsa 2048); it signs mail from now on. Publish this record:"
        )
    );
    let rsa_value = record(lines[1], &rsa_sel, "example.org", "rsa", 392);
    assert_eq!(lines[1].matches("\" \"").count(), 1, "{}", lines[1]);

    // Ed25519 under a selector of our own: 32 bytes, 44 characters.
    let stdout = ok(
        &url,
        &[
            "dkim",
            "keygen",
            "example.org",
            "--algorithm",
            "ed25519",
            "--selector",
            "Phone",
        ],
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0],
        "; added DKIM key phone of example.org (ed25519); it signs mail from now on. Publish this record:"
    );
    let ed_value = record(lines[1], "phone", "example.org", "ed25519", 44);

    // A second RSA key waits until the first is removed.
    let stdout = ok(
        &url,
        &["dkim", "keygen", "example.org", "--selector", "next"],
    );
    assert!(
        stdout.starts_with(
            "; added DKIM key next of example.org (rsa 2048); it signs once the older key is removed. Publish this record:\n"
        ),
        "{stdout}"
    );

    // dns prints the records again, oldest first; or one selector's.
    let dns = ok(&url, &["dkim", "dns", "example.org"]);
    let dns: Vec<&str> = dns.lines().collect();
    assert_eq!(dns.len(), 3);
    assert!(
        dns.contains(
            &format!(
                "{rsa_sel}._domainkey.example.org. IN TXT \"{}\" \"{}\"",
                &rsa_value[..255],
                &rsa_value[255..]
            )
            .as_str()
        )
    );
    assert_eq!(
        ok(&url, &["dkim", "dns", "example.org", "phone"]),
        format!("phone._domainkey.example.org. IN TXT \"{ed_value}\"\n")
    );

    let list = ok(&url, &["dkim", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let rows = list.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let row = |sel: &str| rows.iter().find(|r| r["selector"] == sel).unwrap().clone();
    assert_eq!(row("phone")["algorithm"], "ed25519");
    assert_eq!(row("phone")["signing"], true);
    assert_eq!(row(&rsa_sel)["signing"], true);
    assert_eq!(row("next")["signing"], false);
    assert_eq!(row("next")["domain"], "example.org");
    let keys: Vec<&String> = rows[0].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "algorithm",
            "created",
            "domain",
            "public_key",
            "selector",
            "signing"
        ]
    );
    assert!(
        row("phone")["created"]
            .as_str()
            .unwrap()
            .starts_with(&format!(
                "{}-{}-{}T",
                &today[..4],
                &today[4..6],
                &today[6..]
            ))
    );
    let text = ok(&url, &["dkim", "list", "example.org"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("example.org\tnext\trsa\t") && l.ends_with("\twaiting")),
        "{text}"
    );

    // Errors: one line each, nothing changed.
    assert_eq!(
        fails(
            &url,
            &["dkim", "keygen", "example.org", "--selector", "phone"]
        ),
        "letterbox: DKIM key phone of example.org exists already; choose another selector with --selector\n"
    );
    assert_eq!(
        fails(&url, &["dkim", "keygen", "nowhere.example"]),
        "letterbox: domain nowhere.example is not served; add it first with `letterbox domain add nowhere.example`\n"
    );
    assert_eq!(
        fails(
            &url,
            &["dkim", "keygen", "example.org", "--selector", "a_b"]
        ),
        "letterbox: selector \"a_b\" is not valid: use letters, digits and hyphens, in dot-separated labels of at most 63\n"
    );
    assert!(
        fails(
            &url,
            &["dkim", "keygen", "example.org", "--algorithm", "dsa"]
        )
        .contains("invalid value 'dsa' for '--algorithm <ALGORITHM>'")
    );
    assert_eq!(
        fails(&url, &["dkim", "remove", "example.org", "gone"]),
        "letterbox: DKIM key gone of example.org does not exist\n"
    );
    assert_eq!(
        fails(&url, &["dkim", "dns", "example.org", "gone"]),
        "letterbox: DKIM key gone of example.org does not exist\n"
    );
    ok(&url, &["domain", "add", "bare.example"]);
    assert_eq!(
        fails(&url, &["dkim", "dns", "bare.example"]),
        "letterbox: bare.example has no DKIM key; make one with `letterbox dkim keygen bare.example`\n"
    );
    assert_eq!(
        fails(&url, &["dkim", "list", "nowhere.example"]),
        "letterbox: domain nowhere.example is not served; add it first with `letterbox domain add nowhere.example`\n"
    );

    // Removing the signing RSA key lets the next one sign.
    assert_eq!(
        ok(&url, &["dkim", "remove", "example.org", &rsa_sel]),
        format!(
            "removed DKIM key {rsa_sel} of example.org; its record {rsa_sel}._domainkey.example.org. can go once mail signed with it is delivered\n"
        )
    );
    let text = ok(&url, &["dkim", "list"]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("example.org\tnext\trsa\t") && l.ends_with("\tsigning")),
        "{text}"
    );
    // Removing the domain removes its keys.
    ok(&url, &["domain", "remove", "example.org"]);
    assert_eq!(ok(&url, &["dkim", "list"]), "");
}

fn connector(der: Vec<u8>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der.into()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Keys made with the CLI; a message submitted over 587 with STARTTLS
/// arrives with an RSA and an Ed25519 signature, both verified by dkimpy
/// with the records the CLI printed, and broken by a changed body or an
/// added From:; mail that came in on port 25 is not signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_verify_with_dkimpy() {
    let certs = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["mx.example.org".into()]).unwrap();
    let (cert, key) = (certs.path().join("c.pem"), certs.path().join("k.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let s = TestServer::start(|c| {
        c.tls.cert = Some(cert);
        c.tls.key = Some(key);
        c.submission.listen = vec!["127.0.0.1:0".parse().unwrap()];
    })
    .await;
    let hash = tokio::task::spawn_blocking(|| letterbox::password::hash("pw").unwrap())
        .await
        .unwrap();
    s.directory
        .user_set_password("alice@example.org", Some('+'), &hash)
        .await
        .unwrap();
    let url = s.config.database.url.clone();
    let records = tokio::task::spawn_blocking(move || {
        let rsa = ok(&url, &["dkim", "keygen", "example.org", "--selector", "r1"]);
        let ed = ok(
            &url,
            &[
                "dkim",
                "keygen",
                "example.org",
                "--selector",
                "e1",
                "--algorithm",
                "ed25519",
            ],
        );
        [rsa, ed].map(|o| o.lines().nth(1).unwrap().to_string())
    })
    .await
    .unwrap();

    let addr = s.running.as_ref().unwrap().submission_addrs[0];
    let mut c = Client::new(TcpStream::connect(addr).await.unwrap());
    c.greeting().await;
    c.cmd_prefix("EHLO client.example", "250-").await;
    c.cmd("STARTTLS", "220 2.0.0 Ready to start TLS").await;
    let tls = connector(ck.cert.der().to_vec())
        .connect("mx.example.org".try_into().unwrap(), c.stream.into_inner())
        .await
        .unwrap();
    let mut t = Client::new(tls);
    t.cmd_prefix("EHLO client.example", "250-").await;
    t.cmd(
        &format!("AUTH PLAIN {}", STANDARD.encode("\0alice@example.org\0pw")),
        "235 2.7.0 Authentication successful",
    )
    .await;
    t.cmd("MAIL FROM:<alice@example.org>", "250 2.1.0 Sender ok")
        .await;
    t.cmd("RCPT TO:<bob@example.org>", "250 2.1.5 Recipient ok")
        .await;
    t.cmd("DATA", "354 End data with <CR><LF>.<CR><LF>").await;
    let body = "From: Alice <alice@example.org>\r\nTo: Bob <bob@example.org>\r\n\
                Subject: signed\r\nDate: Mon, 7 Dec 2026 10:00:00 +0000\r\n\
                Message-ID: <1@example.org>\r\n\r\nHello Bob,\r\n\r\n\
                ..a line that started with a dot\r\n   trailing spaces   \r\n\r\n\r\n";
    t.send(body.as_bytes()).await;
    t.send(b".\r\n").await;
    let reply = t.reply().await;
    assert!(reply.starts_with("250 2.0.0 Ok: delivered as "), "{reply}");

    let file = s.new_files("bob@example.org").pop().unwrap();
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.matches("DKIM-Signature: ").count(), 2, "{text}");
    // Below our Received field, RSA first, above the content.
    let received = text.find("Received: ").unwrap();
    let rsa = text
        .find("DKIM-Signature: v=1; a=rsa-sha256; s=r1; d=example.org;")
        .unwrap();
    let ed = text
        .find("DKIM-Signature: v=1; a=ed25519-sha256; s=e1; d=example.org;")
        .unwrap();
    let from = text.find("From: Alice").unwrap();
    assert!(received < rsa && rsa < ed && ed < from, "{text}");

    let script = format!(
        r#"
import sys, dkim
records = {{}}
for line in {records:?}:
    name, _, strings = line.partition(" IN TXT ")
    records[name] = "".join(strings.strip()[1:-1].split('" "')).encode()
def dnsfunc(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    if not name.endswith("."):
        name += "."
    return records.get(name)
msg = open({path:?}, "rb").read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
d = dkim.DKIM(msg)
results = [d.verify(idx=i, dnsfunc=dnsfunc) for i in range(2)]
assert results == [True, True], results
# A changed body or an added From fails (dkimpy raises or says False).
def verifies(m, idx):
    try:
        return dkim.DKIM(m).verify(idx=idx, dnsfunc=dnsfunc)
    except dkim.ValidationError:
        return False
bad = msg.replace(b"Hello Bob", b"Hello Eve")
assert not verifies(bad, 0) and not verifies(bad, 1)
extra = msg.replace(b"From: Alice", b"From: eve@evil.example\r\nFrom: Alice", 1)
assert not verifies(extra, 0) and not verifies(extra, 1)
print("ok")
"#,
        records = records.to_vec(),
        path = file.display().to_string(),
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("/usr/bin/python3")
            .arg("-c")
            .arg(script)
            .output()
            .expect("python3 with dkimpy (python3-dkim, python3-nacl) is required")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");

    // Port 25 mail is never signed.
    let mut mx = s.connect().await;
    mx.greeting().await;
    let reply = mx
        .send_mail(
            "alice@example.org",
            &["bob@example.org"],
            "From: alice@example.org\r\nSubject: unsigned\r\n\r\nx\r\n",
        )
        .await;
    assert!(reply.starts_with("250 "), "{reply}");
    let files = s.new_files("bob@example.org");
    let unsigned = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .find(|t| t.contains("Subject: unsigned"))
        .unwrap();
    assert!(!unsigned.contains("DKIM-Signature"), "{unsigned}");
}
