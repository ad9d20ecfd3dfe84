//! Connection limits shared by every listener: `smtp.max_connections`
//! overall and `smtp.max_connections_per_ip` per client address, counted
//! once across SMTP, LMTP and any later listener, so adding a listen
//! address never raises either cap (nor the open files the server needs).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `smtp.max_connections` connections are open.
    Total,
    /// `smtp.max_connections_per_ip` connections are open from this address.
    PerIp,
}

/// Open connections, overall and per client IP.
#[derive(Debug, Default)]
pub struct Connections {
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// A connection's place in the counts, given back when it is dropped.
#[derive(Debug)]
pub struct Slot {
    connections: Arc<Connections>,
    /// None for a unix socket: its clients are local, one account.
    ip: Option<IpAddr>,
}

impl Connections {
    /// Takes a slot, or says which limit refused it. `ip` is None for a
    /// unix socket, which counts toward the total only.
    pub fn acquire(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
        max_total: usize,
        max_per_ip: usize,
    ) -> Result<Slot, Refused> {
        let mut c = self.counts.lock().unwrap();
        if c.total >= max_total {
            return Err(Refused::Total);
        }
        if let Some(ip) = ip {
            let n = c.per_ip.entry(ip).or_insert(0);
            if *n >= max_per_ip {
                return Err(Refused::PerIp);
            }
            *n += 1;
        }
        c.total += 1;
        Ok(Slot {
            connections: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.counts.lock().unwrap().total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.connections.counts.lock().unwrap();
        c.total -= 1;
        if let Some(ip) = self.ip
            && let Some(n) = c.per_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_hold_across_acquirers_and_slots_come_back() {
        let c = Arc::new(Connections::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = c.acquire(Some(a), 3, 1).unwrap();
        assert_eq!(c.acquire(Some(a), 3, 1).unwrap_err(), Refused::PerIp);
        let _s2 = c.acquire(Some(b), 3, 1).unwrap();
        let _s3 = c.acquire(None, 3, 1).unwrap();
        assert_eq!(c.acquire(None, 3, 1).unwrap_err(), Refused::Total);
        drop(s1);
        assert_eq!(c.open(), 2);
        c.acquire(Some(a), 3, 1).unwrap();
    }
}
