//! IP pools: a named subnet with a range of addresses to hand out, its gateway and name servers.
//! A personality asks for "the next free address of pool P" by writing `pool:P` where an
//! address goes; the node picks the lowest address of the range that no volume's personality
//! holds. The personalities are the only record of what is taken (one source of truth): an
//! address is held exactly while a stored personality names it, and free again when that
//! personality changes or its volume is deleted.

use std::collections::BTreeSet;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::Dns;
use super::validate::{Invalid, bits, in_subnet, parse_cidr, usable};

/// How a personality names a pool where an address goes.
pub const POOL_REF: &str = "pool:";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IpPool {
    pub name: String,
    /// The subnet, as `ADDR/PREFIX` (`10.0.0.0/24`): every address handed out carries its
    /// prefix.
    pub subnet: String,
    /// The range handed out, both ends included.
    pub first: IpAddr,
    pub last: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

fn num(ip: IpAddr) -> u128 {
    bits(ip).0
}

fn from_num(like: IpAddr, n: u128) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from(n as u32)),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::from(n)),
    }
}

/// Most addresses one pool may hand out (a range is scanned to find a free address).
pub const MAX_POOL_ADDRESSES: u128 = 1 << 16;

impl IpPool {
    /// The subnet's network address and prefix.
    pub fn net(&self) -> (IpAddr, u8) {
        parse_cidr(&self.subnet).expect("validated")
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let (net, prefix) = self.net();
        in_subnet(ip, net, prefix)
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        crate::names::validate_name(&self.name).map_err(|m| Invalid::new("name", m))?;
        let (net, prefix) = parse_cidr(&self.subnet).map_err(|m| Invalid::new("subnet", m))?;
        let width = if net.is_ipv4() { 32 } else { 128 };
        // The host part's mask; none for a /32 or /128 (a shift by the whole width would
        // overflow).
        let host_bits = u128::MAX
            .checked_shr(128 - (width - u32::from(prefix)))
            .unwrap_or(0);
        if num(net) & host_bits != 0 {
            return Err(Invalid::new(
                "subnet",
                format!(
                    "{:?} has host bits set; the subnet is its network address",
                    self.subnet
                ),
            ));
        }
        for (field, ip) in [("first", self.first), ("last", self.last)] {
            if !self.contains(ip) {
                return Err(Invalid::new(
                    field,
                    format!("{ip} is outside the subnet {}", self.subnet),
                ));
            }
        }
        for (field, ip) in [("first", self.first), ("last", self.last)] {
            if usable(ip, prefix).is_err() {
                return Err(Invalid::new(
                    field,
                    format!("{ip} is the subnet's network or broadcast address"),
                ));
            }
        }
        if num(self.first) > num(self.last) {
            return Err(Invalid::new(
                "last",
                format!("{} comes before first ({})", self.last, self.first),
            ));
        }
        if num(self.last) - num(self.first) >= MAX_POOL_ADDRESSES {
            return Err(Invalid::new(
                "last",
                format!("a pool hands out at most {MAX_POOL_ADDRESSES} addresses"),
            ));
        }
        if let Some(gw) = self.gateway {
            if !self.contains(gw) {
                return Err(Invalid::new(
                    "gateway",
                    format!("{gw} is outside the subnet {}", self.subnet),
                ));
            }
            if (num(self.first)..=num(self.last)).contains(&num(gw)) {
                return Err(Invalid::new(
                    "gateway",
                    format!("{gw} is inside the range handed out"),
                ));
            }
            if usable(gw, prefix).is_err() {
                return Err(Invalid::new(
                    "gateway",
                    format!("{gw} is the subnet's network or broadcast address"),
                ));
            }
        }
        super::validate::dns("dns", &self.dns)?;
        Ok(())
    }

    /// The lowest address of the range that is not in `taken`, with the subnet's prefix
    /// (`10.0.0.100/24`); `None` when the range is used up. Network and broadcast addresses are
    /// never handed out.
    pub fn next_free(&self, taken: &BTreeSet<IpAddr>) -> Option<String> {
        let (_, prefix) = self.net();
        (num(self.first)..=num(self.last))
            .map(|n| from_num(self.first, n))
            .find(|ip| !taken.contains(ip) && usable(*ip, prefix).is_ok())
            .map(|ip| format!("{ip}/{prefix}"))
    }

    /// Addresses the pool can hand out.
    pub fn size(&self) -> u128 {
        num(self.last) - num(self.first) + 1
    }

    /// Whether `ip` is one of the addresses this pool hands out.
    pub fn in_range(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.first.is_ipv4()
            && (num(self.first)..=num(self.last)).contains(&num(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> IpPool {
        IpPool {
            name: "rack1".into(),
            subnet: "10.0.0.0/24".into(),
            first: "10.0.0.100".parse().unwrap(),
            last: "10.0.0.102".parse().unwrap(),
            gateway: Some("10.0.0.1".parse().unwrap()),
            dns: Dns::default(),
        }
    }

    #[test]
    fn addresses_are_handed_out_lowest_first_until_the_range_is_used_up() {
        let p = pool();
        p.validate().unwrap();
        let mut taken = BTreeSet::new();
        for want in ["10.0.0.100/24", "10.0.0.101/24", "10.0.0.102/24"] {
            let got = p.next_free(&taken).unwrap();
            assert_eq!(got, want);
            taken.insert(parse_cidr(&got).unwrap().0);
        }
        assert_eq!(p.next_free(&taken), None);
        assert_eq!(taken.iter().filter(|ip| p.in_range(**ip)).count(), 3);
        taken.remove(&"10.0.0.101".parse().unwrap());
        assert_eq!(p.next_free(&taken).unwrap(), "10.0.0.101/24");
    }

    /// A single-address subnet is a valid pool (it used to overflow the host mask: a node
    /// abort with overflow checks on).
    #[test]
    fn host_route_pools_validate() {
        let p = IpPool {
            subnet: "10.0.0.7/32".into(),
            first: "10.0.0.7".parse().unwrap(),
            last: "10.0.0.7".parse().unwrap(),
            gateway: None,
            ..pool()
        };
        p.validate().unwrap();
        assert_eq!(p.next_free(&BTreeSet::new()).unwrap(), "10.0.0.7/32");
        let v6 = IpPool {
            subnet: "2001:db8::7/128".into(),
            first: "2001:db8::7".parse().unwrap(),
            last: "2001:db8::7".parse().unwrap(),
            gateway: None,
            ..pool()
        };
        v6.validate().unwrap();
    }

    #[test]
    fn bad_pools_are_refused_by_field() {
        let cases: Vec<(IpPool, &str)> = vec![
            (
                IpPool {
                    subnet: "10.0.0.5/24".into(),
                    ..pool()
                },
                "subnet",
            ),
            (
                IpPool {
                    first: "10.0.1.100".parse().unwrap(),
                    ..pool()
                },
                "first",
            ),
            (
                IpPool {
                    last: "10.0.0.99".parse().unwrap(),
                    ..pool()
                },
                "last",
            ),
            (
                IpPool {
                    gateway: Some("10.0.0.101".parse().unwrap()),
                    ..pool()
                },
                "gateway",
            ),
            (
                IpPool {
                    name: "-x".into(),
                    ..pool()
                },
                "name",
            ),
            (
                IpPool {
                    first: "10.0.0.0".parse().unwrap(),
                    ..pool()
                },
                "first",
            ),
            (
                IpPool {
                    gateway: Some("10.0.0.0".parse().unwrap()),
                    ..pool()
                },
                "gateway",
            ),
            (
                IpPool {
                    dns: Dns {
                        servers: vec![],
                        search: vec!["bad domain".into()],
                    },
                    ..pool()
                },
                "dns.search[0]",
            ),
        ];
        for (p, field) in cases {
            assert_eq!(p.validate().unwrap_err().field, field, "{p:?}");
        }
    }
}
