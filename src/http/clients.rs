//! A cap on the connections one client holds open at once, on each listener.
//!
//! `--max-connections` bounds a listener as a whole; without a bound per client, one client
//! could take every connection and keep it (closing and reopening as the idle and header
//! deadlines end them), and the others would wait in the backlog. Here each accepted
//! connection takes a [`ClientSlot`] for its client's address until it closes; beyond
//! `--max-connections-per-client` a new one is closed at once. A client is an IPv4 address,
//! or the /64 prefix of an IPv6 one (what one host is usually given; IPv4-mapped addresses
//! count as IPv4). A reverse proxy in front of the server is one client: its cap is then
//! the proxy's.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// Default `--max-connections-per-client`: a quarter of the default listener cap (4096), so
/// that one client alone cannot fill it, far above what a load balancer's pool or a load
/// test uses.
pub const DEFAULT_MAX_PER_CLIENT: usize = 1024;

/// Open connections per client of one listener.
#[derive(Debug)]
pub struct ClientCounts {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection of a client; the count goes down when it is dropped.
#[derive(Debug)]
pub struct ClientSlot {
    counts: Arc<ClientCounts>,
    client: IpAddr,
}

/// The client (its address) a request came from, put in the request's extensions by the
/// listener's connection ([`super::idle::Tracked`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

/// The address a client is counted under.
fn client_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl ClientCounts {
    pub fn new(max: usize) -> Arc<ClientCounts> {
        Arc::new(ClientCounts {
            max: max.max(1),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a new connection from `ip`; `None` when its client already holds the most
    /// it may.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let client = client_of(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(client).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            counts: self.clone(),
            client,
        })
    }

    /// Connections open from `ip`'s client.
    pub fn open(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(&client_of(ip)).copied().unwrap_or(0)
    }

    /// The most one client may hold.
    pub fn max(&self) -> usize {
        self.max
    }
}

impl ClientSlot {
    /// The client this slot counts for.
    pub fn client(&self) -> IpAddr {
        self.client
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.client);
            }
        }
    }
}

/// Logs (without the address beyond its client) and counts a connection refused for its
/// client's cap.
pub fn refused(listener: &'static str, counts: &ClientCounts) {
    metrics::counter!(
        "nightingale_http_connections_refused_total",
        "listener" => listener,
        "reason" => "per_client"
    )
    .increment(1);
    if let Some(held) = PER_CLIENT_LOG.allow() {
        tracing::info!(
            listener,
            max = counts.max(),
            not_logged_before = held,
            "connection closed: its client holds --max-connections-per-client already"
        );
    }
}

/// At most a line a second for these refusals (a client looping on connect wrote a line per
/// attempt); the metric counts each.
static PER_CLIENT_LOG: crate::log_limit::LogLimit = crate::log_limit::LogLimit::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_holds_at_most_its_cap_and_gets_slots_back_as_they_close() {
        let counts = ClientCounts::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = counts.admit(a).unwrap();
        let _second = counts.admit(a).unwrap();
        assert!(counts.admit(a).is_none());
        // Another client is not affected.
        let _other = counts.admit(b).unwrap();
        drop(first);
        assert_eq!(counts.open(a), 1);
        let _third = counts.admit(a).unwrap();
        assert!(counts.admit(a).is_none());
    }

    #[test]
    fn ipv6_clients_are_their_64_prefix_and_mapped_ipv4_is_ipv4() {
        let counts = ClientCounts::new(1);
        let _one = counts.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(
            counts
                .admit("2001:db8:1:2:ffff::9".parse().unwrap())
                .is_none()
        );
        let _other_prefix = counts.admit("2001:db8:1:3::1".parse().unwrap()).unwrap();
        let _v4 = counts.admit("192.0.2.7".parse().unwrap()).unwrap();
        assert!(counts.admit("::ffff:192.0.2.7".parse().unwrap()).is_none());
    }

    #[test]
    fn the_table_forgets_clients_with_nothing_open() {
        let counts = ClientCounts::new(4);
        for i in 0..1000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(i));
            drop(counts.admit(ip).unwrap());
        }
        assert!(counts.open.lock().unwrap().is_empty());
    }
}
