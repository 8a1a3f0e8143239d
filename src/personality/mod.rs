//! Personalities (issue 22): what makes one server different from the next (hostname, network,
//! keys), as validated data, rendered as the cloud-init NoCloud documents today's images read at
//! first boot (`meta-data`, `user-data`, `network-config` version 2).
//!
//! Input comes from operators' files: every field is checked before anything is stored, and a
//! refusal names the field and the value (`interfaces[1].addresses[0]: "10.0.0.300/24" is not
//! ...`). The documents are written as JSON, which is YAML: cloud-init reads them as it reads
//! YAML, and no YAML emitter is needed.

pub mod cidata;
pub mod ippool;
pub mod plan;
pub mod seed;
mod validate;

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

pub use validate::Invalid;

/// The address of an `ADDR/PREFIX`, if it is one.
pub fn validate_cidr(s: &str) -> Option<IpAddr> {
    validate::parse_cidr(s).ok().map(|(ip, _)| ip)
}

/// A server's personality. `instance_id` is not the operator's: the node sets a new one each
/// time the personality changes, so cloud-init runs its first-boot steps again.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Personality {
    /// One RFC 1123 label (`web-01`).
    pub hostname: String,
    /// The fully qualified name; it must begin with the hostname (`web-01.example.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fqdn: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bonds: Vec<Bond>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vlans: Vec<Vlan>,
    /// Name servers and search domains for every interface that names none of its own.
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
    /// OpenSSH public keys (`ssh-ed25519 AAAA... comment`, without options) for the default
    /// user, and for `user` too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
    /// A user with a password (given as a crypt(3) hash, never in clear).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
    /// More cloud-config, merged into the generated user-data (it may not set what the fields
    /// above own: hostname, fqdn, ssh_authorized_keys, users).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_config: Option<Map<String, Value>>,
    /// Set by the node, changed with every change of the personality.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub instance_id: String,
}

/// A network interface, matched by MAC address (and then given `name`), or by `name` alone.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(flatten)]
    pub ip: Addressing,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// Interfaces teamed into one.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Bond {
    pub name: String,
    /// Names of `interfaces` entries (which then carry no addresses of their own).
    pub members: Vec<String>,
    /// `active-backup`, `802.3ad`, `balance-rr`, `balance-xor`, `broadcast`, `balance-tlb` or
    /// `balance-alb`.
    pub mode: String,
    #[serde(flatten)]
    pub ip: Addressing,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// A VLAN on an interface or bond.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Vlan {
    pub name: String,
    /// 1 to 4094.
    pub id: u16,
    /// The interface or bond it runs on.
    pub link: String,
    #[serde(flatten)]
    pub ip: Addressing,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// How a link gets its addresses.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Addressing {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dhcp4: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dhcp6: bool,
    /// Static addresses with their prefix (`10.0.0.5/24`, `2001:db8::5/64`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// The default route: an address inside one of `addresses`' subnets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty() && self.search.is_empty()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    /// A crypt(3) hash (`$6$...`, `$y$...`), as `mkpasswd` prints it.
    pub password_hash: String,
}

/// The three NoCloud documents of a personality.
#[derive(Debug, Clone, PartialEq)]
pub struct NoCloud {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
}

impl Personality {
    /// Parses a personality file: TOML, or JSON when it starts with `{`. Unknown fields are
    /// refused (a typo must not be silently ignored), then every field is validated.
    pub fn parse(text: &str) -> Result<Personality, Invalid> {
        let p: Personality = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| Invalid::new("", e.to_string()))?
        } else {
            toml::from_str(text)
                .map_err(|e| Invalid::new("", e.to_string().trim_end().to_string()))?
        };
        p.validate()?;
        Ok(p)
    }

    /// Checks every field; the first problem found, named by its path.
    pub fn validate(&self) -> Result<(), Invalid> {
        validate::personality(self)
    }

    /// Every static address of the personality (without prefix), for uniqueness checks
    /// across volumes.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let links = self
            .interfaces
            .iter()
            .map(|i| &i.ip)
            .chain(self.bonds.iter().map(|b| &b.ip))
            .chain(self.vlans.iter().map(|v| &v.ip));
        links
            .flat_map(|a| a.addresses.iter())
            .filter_map(|a| validate::parse_cidr(a).ok().map(|(ip, _)| ip))
            .collect()
    }

    /// Every link's addressing, with its field path (`interfaces[0]`), for the node to hand out
    /// pool addresses into.
    pub fn links_mut(&mut self) -> Vec<(String, &mut Addressing)> {
        let mut out: Vec<(String, &mut Addressing)> = Vec::new();
        for (i, x) in self.interfaces.iter_mut().enumerate() {
            out.push((format!("interfaces[{i}]"), &mut x.ip));
        }
        for (i, x) in self.bonds.iter_mut().enumerate() {
            out.push((format!("bonds[{i}]"), &mut x.ip));
        }
        for (i, x) in self.vlans.iter_mut().enumerate() {
            out.push((format!("vlans[{i}]"), &mut x.ip));
        }
        out
    }

    /// The NoCloud documents (JSON, which cloud-init reads as YAML).
    pub fn nocloud(&self) -> NoCloud {
        let meta = json!({
            "instance-id": self.instance_id,
            "local-hostname": self.hostname,
        });
        let mut user = Map::new();
        if let Some(extra) = &self.cloud_config {
            user.extend(extra.clone());
        }
        user.insert("hostname".into(), json!(self.hostname));
        if let Some(f) = &self.fqdn {
            user.insert("fqdn".into(), json!(f));
        }
        user.insert("preserve_hostname".into(), json!(false));
        if !self.ssh_authorized_keys.is_empty() {
            user.insert(
                "ssh_authorized_keys".into(),
                json!(self.ssh_authorized_keys),
            );
        }
        if let Some(u) = &self.user {
            let mut entry = json!({
                "name": u.name,
                "lock_passwd": false,
                "passwd": u.password_hash,
            });
            // cloud-init's schema refuses an empty key list here.
            if !self.ssh_authorized_keys.is_empty() {
                entry["ssh_authorized_keys"] = json!(self.ssh_authorized_keys);
            }
            user.insert("users".into(), json!(["default", entry]));
        }
        let mut net = Map::new();
        net.insert("version".into(), json!(2));
        let ethernets: Map<String, Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut v = self.link(&i.ip, i.mtu);
                if let Some(mac) = &i.mac {
                    v.insert(
                        "match".into(),
                        json!({ "macaddress": mac.to_ascii_lowercase() }),
                    );
                    v.insert("set-name".into(), json!(i.name));
                }
                (i.name.clone(), Value::Object(v))
            })
            .collect();
        if !ethernets.is_empty() {
            net.insert("ethernets".into(), Value::Object(ethernets));
        }
        let bonds: Map<String, Value> = self
            .bonds
            .iter()
            .map(|b| {
                let mut v = self.link(&b.ip, b.mtu);
                v.insert("interfaces".into(), json!(b.members));
                // Link monitoring on (netplan's default is off: an active-backup bond would
                // never fail over).
                v.insert(
                    "parameters".into(),
                    json!({ "mode": b.mode, "mii-monitor-interval": 100 }),
                );
                (b.name.clone(), Value::Object(v))
            })
            .collect();
        if !bonds.is_empty() {
            net.insert("bonds".into(), Value::Object(bonds));
        }
        let vlans: Map<String, Value> = self
            .vlans
            .iter()
            .map(|l| {
                let mut v = self.link(&l.ip, l.mtu);
                v.insert("id".into(), json!(l.id));
                v.insert("link".into(), json!(l.link));
                (l.name.clone(), Value::Object(v))
            })
            .collect();
        if !vlans.is_empty() {
            net.insert("vlans".into(), Value::Object(vlans));
        }
        let pretty = |v: &Value| serde_json::to_string_pretty(v).expect("JSON values serialise");
        NoCloud {
            meta_data: pretty(&meta) + "\n",
            user_data: format!("#cloud-config\n{}\n", pretty(&Value::Object(user))),
            network_config: pretty(&Value::Object(net)) + "\n",
        }
    }

    /// One link's netplan settings.
    fn link(&self, a: &Addressing, mtu: Option<u32>) -> Map<String, Value> {
        let mut v = Map::new();
        v.insert("dhcp4".into(), json!(a.dhcp4));
        if a.dhcp6 {
            v.insert("dhcp6".into(), json!(true));
        }
        if !a.addresses.is_empty() {
            v.insert("addresses".into(), json!(a.addresses));
        }
        if let Some(gw) = a.gateway {
            let to = if gw.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
            v.insert("routes".into(), json!([{ "to": to, "via": gw }]));
        }
        let dns = a.dns.as_ref().unwrap_or(&self.dns);
        // A link's own name servers are always written; the personality's global ones only on
        // links with static addresses (DHCP brings its own).
        if !dns.is_empty() && (a.dns.is_some() || !a.addresses.is_empty()) {
            let mut d = Map::new();
            if !dns.servers.is_empty() {
                d.insert("addresses".into(), json!(dns.servers));
            }
            if !dns.search.is_empty() {
                d.insert("search".into(), json!(dns.search));
            }
            v.insert("nameservers".into(), Value::Object(d));
        }
        if let Some(m) = mtu {
            v.insert("mtu".into(), json!(m));
        }
        v
    }
}

#[cfg(test)]
mod tests;
