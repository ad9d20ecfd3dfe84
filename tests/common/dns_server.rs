//! A real DNS server for tests: dnsmasq on a free loopback port, answering
//! only from the records a test gives it (nothing is forwarded: a test
//! never asks a real resolver, and no name leaves the machine). Debian
//! package `dnsmasq`. Killed when dropped.
//!
//! Records are dnsmasq option lines, for example:
//! `mx-host=a.test,mx.a.test,10`, `host-record=mx.a.test,127.0.1.2`,
//! `mx-host=null.test,.,0` (a null MX),
//! `txt-record=_mta-sts.sts.test,"v=STSv1; id=1"`.

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct DnsServer {
    /// Where it answers, over UDP and TCP.
    pub addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl DnsServer {
    /// Starts dnsmasq with `records`, authoritative-only for `zones`
    /// (`["test"]`): names there it does not know are NXDOMAIN.
    pub fn start(zones: &[&str], records: &[String]) -> DnsServer {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..20 {
            let port = UdpSocket::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let mut conf = format!(
                "port={port}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\nno-poll\n\
                 user=root\nlog-facility={}\nlog-queries\n",
                dir.path().join("log").display()
            );
            for z in zones {
                conf.push_str(&format!("local=/{z}/\n"));
            }
            for r in records {
                conf.push_str(r);
                conf.push('\n');
            }
            let path = dir.path().join("dnsmasq.conf");
            std::fs::write(&path, conf).unwrap();
            let mut child = Command::new("dnsmasq")
                .arg(format!("--conf-file={}", path.display()))
                .arg("--keep-in-foreground")
                .arg("--pid-file=")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("dnsmasq (Debian package dnsmasq) must be installed");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return DnsServer {
                        addr,
                        child,
                        _dir: dir,
                    };
                }
                if let Some(status) = child.try_wait().unwrap() {
                    // Most likely the port was taken in between: try another.
                    eprintln!("dnsmasq exited ({status}); trying another port");
                    break;
                }
                assert!(Instant::now() < deadline, "dnsmasq did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.wait();
        }
        panic!("could not start dnsmasq");
    }

    /// The queries it answered so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free on every one of `ips` (bound, checked, released): for
/// destinations that must share `outbound.port`.
pub fn common_port(ips: &[&str]) -> u16 {
    'outer: for _ in 0..100 {
        let first = std::net::TcpListener::bind((ips[0], 0)).unwrap();
        let port = first.local_addr().unwrap().port();
        let mut held = vec![first];
        for ip in &ips[1..] {
            match std::net::TcpListener::bind((*ip, port)) {
                Ok(l) => held.push(l),
                Err(_) => continue 'outer,
            }
        }
        return port;
    }
    panic!("no port free on all of {ips:?}");
}
