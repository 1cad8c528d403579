//! Who is on the other end of a connection: networks in CIDR notation and the client address
//! behind trusted reverse proxies (`--trusted-proxy`). Pure functions, no I/O.

use std::{
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

/// A network: an address and the length of its prefix in bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    /// At most 32 for IPv4, 128 for IPv6 (checked by `from_str`).
    bits: u8,
}

impl FromStr for Cidr {
    type Err = String;

    /// `10.0.0.0/8`, `fd00::/8`, or a bare address (a network of one).
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a network: write it like 10.0.0.0/8 or fd00::/8"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, bits })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The most `X-Forwarded-For` hops looked at: a longer header is cut, never allocated whole.
const MAX_HOPS: usize = 32;

/// The client's address: `peer` itself unless it is a trusted proxy, in which case the
/// rightmost address of `forwarded_for` that is not a trusted proxy (each proxy appends the
/// address it saw, so everything left of that was written by the client and proves nothing).
/// A malformed header from a trusted proxy leaves the proxy's own address.
pub fn client_address(
    peer: SocketAddr,
    forwarded_for: Option<&str>,
    trusted: &[Cidr],
) -> SocketAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer.ip()) {
        return peer;
    }
    let Some(header) = forwarded_for else {
        return peer;
    };
    for hop in header.rsplit(',').take(MAX_HOPS) {
        let Ok(ip) = hop.trim().parse::<IpAddr>() else {
            return peer;
        };
        if !is_trusted(ip) {
            return SocketAddr::new(ip, 0);
        }
    }
    peer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_and_contain() {
        let net: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(!net.contains("fd00::1".parse().unwrap()));
        let one: Cidr = "127.0.0.1".parse().unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        for bad in [
            "",
            "10.0.0.0/33",
            "fd00::/129",
            "example.com",
            "10.0.0.0/x",
            "1.2.3",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn the_client_behind_a_trusted_proxy() {
        let proxy: SocketAddr = "10.0.0.5:4000".parse().unwrap();
        let trusted = ["10.0.0.0/24".parse().unwrap()];
        let ip = |s: Option<&str>, peer| client_address(peer, s, &trusted).ip().to_string();
        assert_eq!(ip(Some("203.0.113.9"), proxy), "203.0.113.9");
        // The client's own claim (left) is ignored; the proxy's view (right) counts.
        assert_eq!(ip(Some("1.1.1.1, 203.0.113.9"), proxy), "203.0.113.9");
        // Two trusted proxies in a row.
        assert_eq!(ip(Some("203.0.113.9, 10.0.0.7"), proxy), "203.0.113.9");
        // Garbage or nothing from the proxy: the proxy's address.
        assert_eq!(ip(Some("not an address"), proxy), "10.0.0.5");
        assert_eq!(ip(None, proxy), "10.0.0.5");
        // An untrusted peer cannot claim another address.
        let peer: SocketAddr = "198.51.100.1:5".parse().unwrap();
        assert_eq!(ip(Some("203.0.113.9"), peer), "198.51.100.1");
    }
}
