//! `--sink-allowed-cidrs`: where pipeline sinks may connect.

use std::net::IpAddr;

use crate::cidr::{not_public, Cidr};

/// The addresses a sink may be delivered to. Tenants choose sink URLs, and the server makes the
/// request from inside the operator's network, so where it may go is the operator's to say.
///
/// By default only public addresses ([`crate::cidr::not_public`] names the rest): a sink is a
/// tenant's service on the internet, and anything else is the operator's, the host's loopback
/// and the server's own API, the cloud's metadata service with the node's credentials, the
/// cluster and the data centre. `--sink-allowed-cidrs` replaces that with the networks it lists;
/// the word `public` in the list keeps public addresses allowed beside them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinkNetworks {
    public: bool,
    listed: Vec<Cidr>,
}

impl Default for SinkNetworks {
    fn default() -> Self {
        SinkNetworks { public: true, listed: Vec::new() }
    }
}

impl SinkNetworks {
    /// `--sink-allowed-cidrs`: networks such as `10.0.0.0/8,fd00::/8`, and optionally the word
    /// `public`. Empty: the default, public addresses only.
    ///
    /// ```
    /// use tensor_wasm::settings::SinkNetworks;
    /// let default = SinkNetworks::parse("").unwrap();
    /// assert!(default.allows("8.8.8.8".parse().unwrap()));
    /// for refused in ["10.1.2.3", "127.0.0.1", "169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254"] {
    ///     assert!(!default.allows(refused.parse().unwrap()), "{refused}");
    /// }
    /// let only = SinkNetworks::parse("10.0.0.0/8").unwrap();
    /// assert!(only.allows("10.1.2.3".parse().unwrap()));
    /// assert!(!only.allows("127.0.0.1".parse().unwrap()));
    /// assert!(!only.allows("8.8.8.8".parse().unwrap()));
    /// let both = SinkNetworks::parse("public, 10.0.0.0/8").unwrap();
    /// assert!(both.allows("10.1.2.3".parse().unwrap()) && both.allows("8.8.8.8".parse().unwrap()));
    /// assert!(!both.allows("127.0.0.1".parse().unwrap()));
    /// ```
    pub fn parse(list: &str) -> Result<SinkNetworks, String> {
        let mut networks = SinkNetworks { public: false, listed: Vec::new() };
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry.eq_ignore_ascii_case("public") {
                networks.public = true;
            } else {
                networks.listed.push(Cidr::parse(entry)?);
            }
        }
        if networks.listed.is_empty() && !networks.public {
            return Ok(SinkNetworks::default());
        }
        Ok(networks)
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        self.listed.iter().any(|net| net.contains(ip)) || (self.public && not_public(ip).is_none())
    }

    /// Why `ip` is refused.
    pub fn refusal(&self, ip: IpAddr) -> String {
        match (self.public, not_public(ip)) {
            (true, Some(why)) => {
                format!("{ip} is {why}, where sinks may not go unless --sink-allowed-cidrs lists it")
            }
            _ => format!("{ip} is outside --sink-allowed-cidrs"),
        }
    }
}
