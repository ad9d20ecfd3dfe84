//! The outbound suites' DNS server: [`super::dns::DnsServer`] answering
//! from the records a test gives it as dnsmasq option lines, for example
//! `mx-host=a.test,mx.a.test,10`, `host-record=mx.a.test,127.0.1.2`,
//! `mx-host=null.test,.,0` (a null MX),
//! `txt-record=_mta-sts.sts.test,"v=STSv1; id=1"`; and the ports its
//! destinations share.

pub use super::dns::DnsServer;
use super::dns::Zone;

/// dnsmasq with `records`, answering from them alone under `zones`
/// (`["test"]`): names there it does not know are NXDOMAIN. These suites
/// need dnsmasq: unlike the trust suites they never skip.
pub fn dns_with(zones: &[&str], records: &[String]) -> DnsServer {
    let zone = records
        .iter()
        .fold(Zone::new().local(zones), |z, r| z.line(r));
    DnsServer::start(&zone).expect("dnsmasq (Debian package dnsmasq-base) must be installed")
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
