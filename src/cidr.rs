//! IP networks, as operators write them: the trusted proxies whose XFCC header is believed, and
//! the networks pipeline sinks may reach; and the addresses that are not public (`not_public`),
//! where a sink may not go unless the operator lists them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An IPv4 or IPv6 network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// `network/prefix`, for constants; `prefix` must fit the address family.
    pub const fn new_const(network: IpAddr, prefix: u8) -> Cidr {
        let max = if network.is_ipv4() { 32 } else { 128 };
        assert!(prefix <= max, "prefix longer than the address");
        Cidr { network, prefix }
    }

    /// `10.0.0.0/8`, `fd00::/8`, or a bare address (a /32 or /128).
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let network: IpAddr = addr.parse().map_err(|_| format!("`{text}` is not an IP network"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => {
                p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("`{text}` has a bad prefix length"))?
            }
        };
        Ok(Cidr { network, prefix })
    }

    /// Whether `a` is inside this IPv6 network, taken as an IPv6 address even when it is an
    /// IPv4-mapped one (which [`contains`](Self::contains) takes as IPv4).
    fn contains_v6(&self, a: Ipv6Addr) -> bool {
        match self.network {
            IpAddr::V6(n) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            IpAddr::V4(_) => false,
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// A network that is not public, and what it is.
type Special = (Cidr, &'static str);

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Cidr {
    Cidr::new_const(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), prefix)
}

const fn v6(segments: [u16; 8], prefix: u8) -> Cidr {
    let [a, b, c, d, e, f, g, h] = segments;
    Cidr::new_const(IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)), prefix)
}

/// IPv4 networks that are not public: IANA's special-purpose registry (RFC 6890 and its
/// successors) where it says "not globally reachable", plus deprecated and cloud-specific
/// addresses. Cloud metadata services, which hand out the node's credentials, sit inside them:
/// 169.254.169.254 (AWS, GCP, Azure, Oracle, OpenStack) and 169.254.170.2 (ECS) in link-local,
/// 100.100.100.200 (Alibaba) in the shared address space, 192.0.0.192 (Oracle) in the IETF
/// protocol block. Azure's WireServer is a public address, so it is listed on its own.
const NOT_PUBLIC_V4: [Special; 20] = [
    (v4(0, 0, 0, 0, 8), "\"this network\" (0.0.0.0/8), which connects to the host itself"),
    (v4(10, 0, 0, 0, 8), "private (10.0.0.0/8)"),
    (v4(100, 64, 0, 0, 10), "shared address space (100.64.0.0/10, CGNAT; Alibaba's metadata service)"),
    (v4(127, 0, 0, 0, 8), "loopback (127.0.0.0/8)"),
    (v4(169, 254, 0, 0, 16), "link-local (169.254.0.0/16), where cloud metadata services answer"),
    (v4(172, 16, 0, 0, 12), "private (172.16.0.0/12)"),
    (v4(192, 0, 0, 0, 24), "IETF protocol assignments (192.0.0.0/24; Oracle's metadata service)"),
    (v4(192, 0, 2, 0, 24), "documentation (192.0.2.0/24)"),
    (v4(192, 88, 99, 0, 24), "the deprecated 6to4 relay anycast (192.88.99.0/24)"),
    (v4(192, 168, 0, 0, 16), "private (192.168.0.0/16)"),
    (v4(198, 18, 0, 0, 15), "benchmarking (198.18.0.0/15)"),
    (v4(198, 51, 100, 0, 24), "documentation (198.51.100.0/24)"),
    (v4(203, 0, 113, 0, 24), "documentation (203.0.113.0/24)"),
    (v4(224, 0, 0, 0, 4), "multicast (224.0.0.0/4)"),
    (v4(255, 255, 255, 255, 32), "the broadcast address"),
    (v4(240, 0, 0, 0, 4), "reserved (240.0.0.0/4)"),
    (v4(168, 63, 129, 16, 32), "Azure's WireServer (168.63.129.16)"),
    // Inside the ranges above, named for a clearer refusal.
    (v4(169, 254, 169, 254, 32), "a cloud metadata service (169.254.169.254)"),
    (v4(100, 100, 100, 200, 32), "Alibaba Cloud's metadata service (100.100.100.200)"),
    (v4(192, 0, 0, 192, 32), "Oracle Cloud's metadata service (192.0.0.192)"),
];

/// IPv6 networks that are not public inside global unicast (2000::/3); everything outside it is
/// not public either (`not_public`), but for the forms that embed an IPv4 address.
const NOT_PUBLIC_V6: [Special; 4] = [
    (v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), "documentation (2001:db8::/32)"),
    (v6([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), "documentation (3fff::/20)"),
    // After Teredo (2001::/32), which embeds an IPv4 address and is judged by it.
    (v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23), "IETF protocol assignments (2001::/23)"),
    (v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254], 128), "AWS's IPv6 metadata service (fd00:ec2::254)"),
];

/// Why `ip` is not a public address, or `None` when it is. A public address is what a tenant's
/// sink on the internet has; everything else reaches into the operator's network: the host
/// itself, its cloud's metadata service, the cluster, the data centre.
///
/// An IPv6 address that embeds an IPv4 one is judged by the IPv4 address, since that is where
/// a connection to it ends up: IPv4-mapped (`::ffff:0:0/96`, a dual-stack socket connects to
/// the IPv4 address), NAT64 (`64:ff9b::/96`, the gateway connects to it), 6to4 (`2002::/16`)
/// and Teredo (`2001::/32`, whose client address is stored inverted, and whose server address
/// is checked too). The other IPv6 ranges outside global unicast (`2000::/3`) are refused
/// outright: loopback, unspecified, IPv4-compatible (deprecated), unique-local `fc00::/7` with
/// AWS's `fd00:ec2::254`, link-local, site-local, multicast, discard-only, local-use NAT64
/// `64:ff9b:1::/48`, SRv6 SIDs.
pub fn not_public(ip: IpAddr) -> Option<NotPublic> {
    match ip {
        IpAddr::V4(a) => not_public_v4(a).map(|what| NotPublic { what, embedded: None }),
        IpAddr::V6(a) => {
            if let Some((form, embedded)) = embedded_ipv4(a) {
                return embedded
                    .iter()
                    .find_map(|e| not_public_v4(*e).map(|_| NotPublic { what: form, embedded: Some(*e) }));
            }
            let special = NOT_PUBLIC_V6.iter().find(|(net, _)| net.contains_v6(a)).map(|(_, what)| *what);
            let what = special.or_else(|| {
                let global_unicast = v6([0x2000, 0, 0, 0, 0, 0, 0, 0], 3);
                (!global_unicast.contains_v6(a)).then(|| v6_outside_global_unicast(a))
            })?;
            Some(NotPublic { what, embedded: None })
        }
    }
}

/// Why an address is not public: what it is, and the IPv4 address it embeds, when that decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotPublic {
    pub what: &'static str,
    pub embedded: Option<Ipv4Addr>,
}

impl std::fmt::Display for NotPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.embedded {
            None => write!(f, "{}", self.what),
            Some(v4) => {
                let inner = not_public_v4(v4).unwrap_or("not public");
                write!(f, "{} of {v4}, which is {inner}", self.what)
            }
        }
    }
}

fn not_public_v4(a: Ipv4Addr) -> Option<&'static str> {
    let ip = IpAddr::V4(a);
    // The most specific match names the address best: a metadata service over its range.
    NOT_PUBLIC_V4.iter().filter(|(net, _)| net.contains(ip)).max_by_key(|(net, _)| net.prefix).map(|(_, what)| *what)
}

/// The IPv4 addresses an IPv6 address carries, when it is one of the forms that embed them, and
/// the form's name. Teredo carries two: the server's, and the client's inverted.
fn embedded_ipv4(a: Ipv6Addr) -> Option<(&'static str, Vec<Ipv4Addr>)> {
    let bits = u128::from(a);
    let low32 = Ipv4Addr::from(bits as u32);
    if v6([0, 0, 0, 0, 0, 0xffff, 0, 0], 96).contains_v6(a) {
        Some(("the IPv4-mapped form", vec![low32]))
    } else if v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96).contains_v6(a) {
        Some(("the NAT64 form", vec![low32]))
    } else if v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16).contains_v6(a) {
        Some(("the 6to4 form", vec![Ipv4Addr::from((bits >> 80) as u32)]))
    } else if v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32).contains_v6(a) {
        Some(("the Teredo form", vec![Ipv4Addr::from(!(bits as u32)), Ipv4Addr::from((bits >> 64) as u32)]))
    } else {
        None
    }
}

/// What an IPv6 address outside global unicast (2000::/3) is.
fn v6_outside_global_unicast(a: Ipv6Addr) -> &'static str {
    const NAMED: [Special; 9] = [
        (v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified (::), which connects to the host itself"),
        (v6([0, 0, 0, 0, 0, 0, 0, 1], 128), "loopback (::1)"),
        (v6([0, 0, 0, 0, 0, 0, 0, 0], 96), "IPv4-compatible (::/96, deprecated)"),
        (v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48), "local-use NAT64 (64:ff9b:1::/48)"),
        (v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64), "discard-only (100::/64)"),
        (v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7), "unique-local (fc00::/7)"),
        (v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local (fe80::/10)"),
        (v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), "site-local (fec0::/10, deprecated)"),
        (v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8), "multicast (ff00::/8)"),
    ];
    NAMED
        .iter()
        .filter(|(net, _)| net.contains_v6(a))
        .max_by_key(|(net, _)| net.prefix)
        .map_or("outside IPv6 global unicast (2000::/3)", |(_, what)| *what)
}

/// Parses a comma-separated list of networks.
pub fn parse_cidrs(list: &str) -> Result<Vec<Cidr>, String> {
    list.split(',').filter(|s| !s.trim().is_empty()).map(Cidr::parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let nets = parse_cidrs("10.0.0.0/8, 192.168.1.7, fd00::/8").unwrap();
        assert!(nets[0].contains("10.1.2.3".parse().unwrap()));
        assert!(!nets[0].contains("11.0.0.1".parse().unwrap()));
        assert!(nets[1].contains("192.168.1.7".parse().unwrap()));
        assert!(!nets[1].contains("192.168.1.8".parse().unwrap()));
        assert!(nets[2].contains("fd12::1".parse().unwrap()));
        assert!(nets[0].contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "nonsense", "1.2.3.4/x"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    /// Every refused address: (address, words its refusal must contain).
    const REFUSED: &[(&str, &str)] = &[
        ("0.0.0.0", "this network"),
        ("0.1.2.3", "this network"),
        ("10.1.2.3", "private"),
        ("100.64.0.1", "shared address space"),
        ("100.127.255.255", "shared address space"),
        ("100.100.100.200", "Alibaba"),
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("169.254.0.1", "link-local"),
        ("169.254.169.254", "metadata"),
        ("169.254.170.2", "link-local"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.0.0.1", "IETF protocol"),
        ("192.0.0.192", "Oracle"),
        ("192.0.2.1", "documentation"),
        ("192.88.99.1", "6to4 relay"),
        ("192.168.1.1", "private"),
        ("198.18.0.1", "benchmarking"),
        ("198.19.255.255", "benchmarking"),
        ("198.51.100.7", "documentation"),
        ("203.0.113.9", "documentation"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("168.63.129.16", "WireServer"),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("::127.0.0.1", "IPv4-compatible"),
        ("::8.8.8.8", "IPv4-compatible"),
        ("fc00::1", "unique-local"),
        ("fd12:3456::1", "unique-local"),
        ("fd00:ec2::254", "AWS"),
        ("fe80::1", "link-local"),
        ("febf::1", "link-local"),
        ("fec0::1", "site-local"),
        ("ff02::1", "multicast"),
        ("ff0e::1", "multicast"),
        ("100::1", "discard-only"),
        ("64:ff9b:1::a9fe:a9fe", "local-use NAT64"),
        ("5f00::1", "outside IPv6 global unicast"),
        ("4000::1", "outside IPv6 global unicast"),
        ("2001:db8::1", "documentation"),
        ("3fff::1", "documentation"),
        ("2001:2::1", "IETF protocol"),
        ("2001:10::1", "IETF protocol"),
        // IPv4-embedded forms of refused IPv4 addresses, each judged by what it embeds.
        ("::ffff:127.0.0.1", "IPv4-mapped form of 127.0.0.1, which is loopback"),
        ("::ffff:169.254.169.254", "IPv4-mapped form of 169.254.169.254, which is a cloud metadata"),
        ("::ffff:10.0.0.1", "IPv4-mapped form of 10.0.0.1"),
        ("::ffff:0.0.0.0", "IPv4-mapped form of 0.0.0.0"),
        ("64:ff9b::a9fe:a9fe", "NAT64 form of 169.254.169.254"),
        ("64:ff9b::7f00:1", "NAT64 form of 127.0.0.1"),
        ("64:ff9b::c0a8:101", "NAT64 form of 192.168.1.1"),
        ("64:ff9b::6464:64c8", "NAT64 form of 100.100.100.200"),
        ("2002:a9fe:a9fe::1", "6to4 form of 169.254.169.254"),
        ("2002:7f00:1::", "6to4 form of 127.0.0.1"),
        ("2002:c000:c0::1", "6to4 form of 192.0.0.192"),
        // Teredo: server 65.54.227.120 (public); client 169.254.169.254 stored inverted
        // (!0xa9fea9fe = 0x56015601).
        ("2001:0:4136:e378:8000:63bf:5601:5601", "Teredo form of 169.254.169.254"),
        // Client 127.0.0.1 inverted: 0x80fffffe.
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo form of 127.0.0.1"),
        // A public client behind a Teredo server at a private address.
        ("2001:0:a00:1:8000:63bf:f7f7:f7f7", "Teredo form of 10.0.0.1"),
    ];

    /// Public addresses, which the default policy lets through.
    const PUBLIC: &[&str] = &[
        "1.1.1.1",
        "8.8.8.8",
        "9.255.255.255",
        "11.0.0.1",
        "100.63.255.255",
        "100.128.0.0",
        "126.255.255.255",
        "128.0.0.1",
        "169.253.255.255",
        "169.255.0.1",
        "172.15.255.255",
        "172.32.0.1",
        "192.0.1.1",
        "192.0.3.1",
        "192.167.255.255",
        "192.169.0.1",
        "198.17.255.255",
        "198.20.0.1",
        "223.255.255.255",
        "168.63.129.17",
        "2606:4700:4700::1111",
        "2a00:1450:4001::200e",
        "2001:4860:4860::8888",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
        // Teredo with a public server (65.54.227.120) and a public client (8.8.8.8 inverted:
        // 0xf7f7f7f7).
        "2001:0:4136:e378:8000:63bf:f7f7:f7f7",
    ];

    #[test]
    fn the_default_policy_refuses_every_address_that_is_not_public() {
        for (address, says) in REFUSED {
            let ip: IpAddr = address.parse().unwrap();
            let refusal = not_public(ip).unwrap_or_else(|| panic!("{address} passed as public"));
            assert!(refusal.to_string().contains(says), "{address}: {refusal}");
        }
        for address in PUBLIC {
            let ip: IpAddr = address.parse().unwrap();
            assert_eq!(not_public(ip), None, "{address}");
        }
    }
}
