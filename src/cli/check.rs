//! `letterbox check`: one line per check, non-zero exit on any failure. A
//! `WARN` line points at something risky that still works; it does not
//! change the exit code.

use std::path::Path;

use crate::config::{Config, ListenAddr};
use crate::directory::{Directory, redact};

pub async fn run(config: &Config, file: Option<&Path>) -> anyhow::Result<()> {
    let mut failed = 0;
    let mut report = |ok: Result<String, String>, what: &str| match ok {
        Ok(msg) => println!("ok    {what}: {msg}"),
        Err(msg) => {
            failed += 1;
            println!("FAIL  {what}: {msg}")
        }
    };
    report(
        Ok(match file {
            Some(f) => format!("loaded {}", f.display()),
            None => "built-in defaults (no config file found)".into(),
        }),
        "config",
    );

    let url = redact(&config.database.url);
    let db = match Directory::connect(&config.database.url, 1, std::time::Duration::ZERO).await {
        Ok(dir) => {
            let r = dir
                .check_migrated()
                .await
                .map(|_| format!("{url} reachable and migrated"));
            dir.close().await;
            r.map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    };
    report(db, "database");
    report(check_root_writable(&config.maildir.root), "maildir root");
    let tls = match (&config.tls.cert, &config.tls.key) {
        // A one-shot command: nothing else waits on this runtime.
        (Some(cert), Some(key)) => {
            crate::blocking::allowed(|| crate::tls::server_config(cert, key))
                .map(|_| {
                    format!(
                        "{} and {} readable and matching",
                        cert.display(),
                        key.display()
                    )
                })
                .map_err(|e| e.to_string())
        }
        _ => Ok("not configured; STARTTLS will not be offered".into()),
    };
    report(tls, "tls");
    for line in lmtp_lines(&config.lmtp.listen) {
        println!("{line}");
    }
    report(check_dns(config).await, "dns");
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed");
    }
    Ok(())
}

/// One line per LMTP address, or one saying LMTP is off. LMTP has no
/// authentication, so a TCP address anyone else can reach is a warning.
fn lmtp_lines(listen: &[ListenAddr]) -> Vec<String> {
    if listen.is_empty() {
        return vec!["ok    lmtp: off".into()];
    }
    listen
        .iter()
        .map(|addr| match addr {
            // An IPv4-mapped IPv6 address (::ffff:127.0.0.1) is loopback too.
            ListenAddr::Tcp(a) if a.ip().to_canonical().is_loopback() => {
                format!("ok    lmtp: {addr} is a loopback address")
            }
            ListenAddr::Tcp(_) => format!(
                "WARN  lmtp: {addr} is not a loopback address; LMTP has no authentication, so anyone who can reach it can deliver mail"
            ),
            ListenAddr::Unix(_) => format!("ok    lmtp: {addr} is a local socket"),
        })
        .collect()
}

/// Whether the resolver answers, when anything uses it.
async fn check_dns(config: &Config) -> Result<String, String> {
    if !config.smtp.reverse_dns && !config.auth.any() && config.dnsbl.is_empty() {
        return Ok("not used (smtp.reverse_dns, [auth] and [[dnsbl]] are off)".into());
    }
    let dns = crate::dns::Dns::new(&config.dns).map_err(|e| e.to_string())?;
    dns.probe(&config.hostname).await
}

/// Creates the root if needed and proves a file can be written and
/// fsync'd there.
fn check_root_writable(root: &Path) -> Result<String, String> {
    let fail = |e: std::io::Error| format!("{}: {e}", root.display());
    std::fs::create_dir_all(root).map_err(fail)?;
    let probe = root.join(format!(".letterbox-check.{}", std::process::id()));
    let written = std::fs::File::create(&probe).and_then(|f| f.sync_all());
    let _ = std::fs::remove_file(&probe);
    written.map_err(fail)?;
    Ok(format!("{} is writable", root.display()))
}
