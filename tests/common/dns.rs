//! A real DNS server for the trust suites: Debian's dnsmasq on
//! 127.0.0.1:<free port>, started by each test with a config of its own
//! in a temp dir and killed when the value drops, serving the records the
//! test gives ([`Zone`]): TXT (long texts split into 255-byte strings, as
//! DKIM keys are published), A, MX and PTR.
//!
//! Names under `.test`, `.example`, `example.org` and `in-addr.arpa` are
//! answered from the config alone (NXDOMAIN when absent), or under the
//! domains [`Zone::local`] names instead. Any other name
//! is REFUSED, since dnsmasq has no upstream: the answer a resolver gives
//! as SERVFAIL when it cannot reach a domain's servers, an error that is
//! not "no such name". [`DnsServer::stop`] takes the server away, so
//! queries time out.
//!
//! dnsmasq comes from the `dnsmasq-base` package (the binary without a
//! system service). When it is missing the test is skipped with a note,
//! unless `CI` is set: then it fails, so the suite never passes by
//! skipping.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::db::is_ci;

/// Where Debian installs dnsmasq.
const DNSMASQ: &str = "/usr/sbin/dnsmasq";

/// The records a test server serves, as dnsmasq config lines.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    lines: String,
    /// Where names are answered from the config alone; None: the
    /// trust suites' domains.
    local: Option<Vec<String>>,
}

impl Zone {
    pub fn new() -> Zone {
        Zone::default()
    }

    /// Answers from the config alone under `domains` only (`["test"]`).
    pub fn local(mut self, domains: &[&str]) -> Zone {
        self.local = Some(domains.iter().map(|d| d.to_string()).collect());
        self
    }

    /// A record as a dnsmasq option line, for what the helpers below do
    /// not cover: `mx-host=null.test,.,0` (a null MX),
    /// `txt-record=_mta-sts.sts.test,"v=STSv1; id=1"`.
    pub fn line(mut self, line: &str) -> Zone {
        writeln!(self.lines, "{line}").unwrap();
        self
    }

    /// A TXT record holding `text`, split into strings of at most 255
    /// bytes (RFC 1035 §3.3.14), which the reader joins again.
    pub fn txt(mut self, name: &str, text: &str) -> Zone {
        assert!(
            !text.contains(['"', '\\']),
            "TXT text {text:?} needs no quoting here"
        );
        let strings: Vec<String> = text
            .as_bytes()
            .chunks(255)
            .map(|c| format!("\"{}\"", std::str::from_utf8(c).unwrap()))
            .collect();
        writeln!(self.lines, "txt-record={name},{}", strings.join(",")).unwrap();
        self
    }

    /// An A record.
    pub fn a(mut self, name: &str, ip: Ipv4Addr) -> Zone {
        writeln!(self.lines, "host-record={name},{ip}").unwrap();
        self
    }

    /// An MX record.
    pub fn mx(mut self, name: &str, host: &str, preference: u16) -> Zone {
        writeln!(self.lines, "mx-host={name},{host},{preference}").unwrap();
        self
    }

    /// A PTR record for `ip`.
    pub fn ptr(mut self, ip: Ipv4Addr, name: &str) -> Zone {
        let [a, b, c, d] = ip.octets();
        writeln!(self.lines, "ptr-record={d}.{c}.{b}.{a}.in-addr.arpa,{name}").unwrap();
        self
    }
}

/// A running dnsmasq.
pub struct DnsServer {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl DnsServer {
    /// Starts dnsmasq serving `zone`; None (the test skips) when dnsmasq
    /// is not installed and `CI` is not set.
    pub fn start(zone: &Zone) -> Option<DnsServer> {
        if !std::path::Path::new(DNSMASQ).exists() {
            if is_ci(std::env::var("CI").ok().as_deref()) {
                panic!("CI is set, so the DNS suites must run: install dnsmasq-base ({DNSMASQ})");
            }
            eprintln!(
                "note: DNS test skipped: {DNSMASQ} is not installed (apt-get install dnsmasq-base)"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        // A free port can be taken between our probe and dnsmasq's bind:
        // try a few.
        for _ in 0..5 {
            let port = free_port();
            let conf = dir.path().join("dnsmasq.conf");
            std::fs::write(&conf, config(port, &dir.path().join("log"), zone)).unwrap();
            let mut child = Command::new(DNSMASQ)
                .arg("--keep-in-foreground")
                .arg(format!("--conf-file={}", conf.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("dnsmasq runs");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if TcpStream::connect(addr).is_ok() {
                    return Some(DnsServer {
                        addr,
                        child: Some(child),
                        dir,
                    });
                }
                if let Some(status) = child.try_wait().unwrap() {
                    let mut err = String::new();
                    use std::io::Read;
                    child
                        .stderr
                        .take()
                        .unwrap()
                        .read_to_string(&mut err)
                        .unwrap();
                    eprintln!("dnsmasq on port {port} exited ({status}): {err}");
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("dnsmasq did not start");
    }

    /// `[dns]` servers for letterbox: this server alone.
    pub fn servers(&self) -> Vec<SocketAddr> {
        vec![self.addr]
    }

    /// Takes the server away: queries to it now go unanswered.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// What dnsmasq logged (every query), for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config(port: u16, log: &std::path::Path, zone: &Zone) -> String {
    let local = match &zone.local {
        Some(domains) => domains.join("/"),
        None => "test/example/example.org/in-addr.arpa".into(),
    };
    format!(
        "port={port}\n\
         listen-address=127.0.0.1\n\
         bind-interfaces\n\
         no-resolv\n\
         no-hosts\n\
         pid-file=\n\
         user=root\n\
         local=/{local}/\n\
         log-queries\n\
         log-facility={log}\n\
         {records}",
        log = log.display(),
        records = zone.lines,
    )
}

/// A port free on 127.0.0.1 for both UDP and TCP, just now.
fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
