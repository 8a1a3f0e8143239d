//! Every check of a personality, each refusal naming the field (by its path in the file) and the
//! value.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::{Addressing, Dns, Personality};

/// A refused personality: which field, and what is wrong with its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

type Check = Result<(), Invalid>;

/// An RFC 1123 label: 1 to 63 letters, digits and hyphens, not starting or ending with a hyphen.
fn label_ok(l: &str) -> bool {
    (1..=63).contains(&l.len())
        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

fn domain_ok(d: &str) -> bool {
    d.len() <= 253 && d.split('.').all(label_ok)
}

/// `ADDR/PREFIX`, the prefix within the family's range (a host route `/32` or `/128` is fine).
pub(crate) fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let bad = || format!("{s:?} is not an address with a prefix (ADDR/PREFIX, e.g. 10.0.0.5/24)");
    let (a, p) = s.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = a.parse().map_err(|_| bad())?;
    // Digits only: `parse` alone would take "+24".
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 3 {
        return Err(bad());
    }
    let prefix: u8 = p.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix == 0 || prefix > max {
        return Err(format!("{s:?}: the prefix must be 1 to {max}"));
    }
    Ok((ip, prefix))
}

pub(super) fn bits(ip: IpAddr) -> (u128, u8) {
    match ip {
        IpAddr::V4(v) => (u128::from(u32::from(v)), 32),
        IpAddr::V6(v) => (u128::from(v), 128),
    }
}

/// Whether `ip` lies in `net/prefix` (same family).
pub(super) fn in_subnet(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    if ip.is_ipv4() != net.is_ipv4() {
        return false;
    }
    let (a, width) = bits(ip);
    let (b, _) = bits(net);
    let shift = u32::from(width - prefix);
    a.checked_shr(shift) == b.checked_shr(shift)
}

pub(super) fn usable(ip: IpAddr, prefix: u8) -> Result<(), String> {
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        return Err(format!("{ip} cannot be an interface's address"));
    }
    if let IpAddr::V4(v) = ip
        && prefix <= 30
    {
        let host = u32::from(v) & (u32::MAX >> prefix);
        if host == 0 || host == u32::MAX >> prefix {
            return Err(format!(
                "{ip}/{prefix} is the subnet's network or broadcast address"
            ));
        }
    }
    Ok(())
}

/// A MAC of a network card: six hex pairs, unicast.
fn mac_ok(m: &str) -> Result<(), String> {
    let parts: Vec<&str> = m.split(':').collect();
    let hex = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if !hex {
        return Err(format!(
            "{m:?} is not a MAC address (six hex pairs, e.g. 52:54:00:12:34:56)"
        ));
    }
    let first = u8::from_str_radix(parts[0], 16).expect("checked hex");
    if first & 1 == 1 {
        return Err(format!(
            "{m:?} is a multicast address, not a network card's"
        ));
    }
    Ok(())
}

/// A Linux interface name: 1 to 15 of letters, digits, `.`, `_`, `-`.
fn ifname_ok(n: &str) -> bool {
    n != "."
        && n != ".."
        && (1..=15).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

const SSH_KEY_TYPES: [&str; 8] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
];

fn ssh_key_ok(k: &str) -> Result<(), String> {
    let short: String = k.chars().take(40).collect();
    if k.contains(['\n', '\r']) {
        return Err(format!("{short:?}...: one key per entry, on one line"));
    }
    let mut words = k.split_whitespace();
    let (Some(kind), Some(blob)) = (words.next(), words.next()) else {
        return Err(format!(
            "{short:?} is not an OpenSSH public key (TYPE BASE64 [COMMENT])"
        ));
    };
    if !SSH_KEY_TYPES.contains(&kind) {
        return Err(format!(
            "{short:?}: key type {kind:?} is not one OpenSSH knows"
        ));
    }
    let b64 = blob
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='));
    if !b64 || blob.len() < 16 {
        return Err(format!("{short:?}: the key's data is not base64"));
    }
    Ok(())
}

fn password_hash_ok(h: &str) -> Result<(), String> {
    // `$id$...$hash`: SHA-512 ($6$), SHA-256 ($5$), yescrypt ($y$), bcrypt ($2b$/$2y$).
    let ids = ["$6$", "$5$", "$y$", "$2a$", "$2b$", "$2y$", "$gy$"];
    let ok = ids.iter().any(|id| h.starts_with(id))
        && h.matches('$').count() >= 3
        && !h.contains(char::is_whitespace)
        && h.len() >= 20;
    if !ok {
        return Err(
            "not a crypt(3) hash ($6$..., $y$...; `mkpasswd -m sha-512` makes one): passwords are \
             never stored in clear"
                .into(),
        );
    }
    Ok(())
}

fn user_name_ok(n: &str) -> bool {
    (1..=32).contains(&n.len())
        && n.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
}

pub(super) fn dns(field: &str, d: &Dns) -> Check {
    for (i, s) in d.search.iter().enumerate() {
        if !domain_ok(s) {
            return Err(Invalid::new(
                format!("{field}.search[{i}]"),
                format!("{s:?} is not a domain name"),
            ));
        }
    }
    for (i, s) in d.servers.iter().enumerate() {
        if s.is_unspecified() || s.is_multicast() {
            return Err(Invalid::new(
                format!("{field}.servers[{i}]"),
                format!("{s} cannot be a name server"),
            ));
        }
    }
    Ok(())
}

/// One link's addressing; `seen` collects every address of the personality (no address twice).
fn addressing(
    field: &str,
    a: &Addressing,
    mtu: Option<u32>,
    seen: &mut BTreeMap<IpAddr, String>,
) -> Check {
    let mut nets = Vec::new();
    let mut from_pools = false;
    for (i, s) in a.addresses.iter().enumerate() {
        let f = format!("{field}.addresses[{i}]");
        if let Some(pool) = s.strip_prefix(super::ippool::POOL_REF) {
            // The node hands out the address (and checks the rest again once it has).
            crate::names::validate_name(pool)
                .map_err(|m| Invalid::new(&f, format!("{s:?}: {m}")))?;
            from_pools = true;
            continue;
        }
        let (ip, prefix) = parse_cidr(s).map_err(|m| Invalid::new(&f, m))?;
        usable(ip, prefix).map_err(|m| Invalid::new(&f, m))?;
        if let Some(other) = seen.insert(ip, f.clone()) {
            return Err(Invalid::new(
                &f,
                format!("{ip} is already the address of {other}"),
            ));
        }
        nets.push((ip, prefix));
    }
    if let Some(gw) = a.gateway.filter(|_| !from_pools) {
        let f = format!("{field}.gateway");
        if a.addresses.is_empty() {
            return Err(Invalid::new(
                &f,
                "a gateway needs a static address beside it (DHCP brings its own)",
            ));
        }
        // An IPv6 router is usually reached by its link-local address.
        let link_local = matches!(gw, IpAddr::V6(v) if v.segments()[0] & 0xffc0 == 0xfe80)
            && nets.iter().any(|(ip, _)| ip.is_ipv6());
        if !link_local && !nets.iter().any(|&(ip, p)| in_subnet(gw, ip, p)) {
            return Err(Invalid::new(
                &f,
                format!(
                    "{gw} is in none of this link's subnets ({})",
                    a.addresses.join(", ")
                ),
            ));
        }
        if nets.iter().any(|&(ip, _)| ip == gw) {
            return Err(Invalid::new(&f, format!("{gw} is this link's own address")));
        }
    }
    if let Some(d) = &a.dns {
        dns(&format!("{field}.dns"), d)?;
    }
    if let Some(m) = mtu {
        let min = if nets.iter().any(|(ip, _)| ip.is_ipv6()) || a.dhcp6 {
            1280
        } else {
            576
        };
        if !(min..=9216).contains(&m) {
            return Err(Invalid::new(
                format!("{field}.mtu"),
                format!("{m} is outside {min} to 9216"),
            ));
        }
    }
    Ok(())
}

pub(super) fn personality(p: &Personality) -> Check {
    if !label_ok(&p.hostname) {
        return Err(Invalid::new(
            "hostname",
            format!(
                "{:?} is not a host name (1 to 63 letters, digits and '-', not at either end; \
                 the domain goes in fqdn)",
                p.hostname
            ),
        ));
    }
    if let Some(f) = &p.fqdn {
        let first = f.split('.').next().unwrap_or("");
        if !domain_ok(f) || !f.contains('.') {
            return Err(Invalid::new(
                "fqdn",
                format!("{f:?} is not a fully qualified domain name"),
            ));
        }
        if !first.eq_ignore_ascii_case(&p.hostname) {
            return Err(Invalid::new(
                "fqdn",
                format!("{f:?} does not begin with the hostname {:?}", p.hostname),
            ));
        }
    }
    let mut names: BTreeSet<&str> = BTreeSet::new();
    let mut seen: BTreeMap<IpAddr, String> = BTreeMap::new();
    let mut macs: BTreeMap<String, String> = BTreeMap::new();
    let name = |field: String, n: &str| -> Check {
        if !ifname_ok(n) {
            return Err(Invalid::new(
                field,
                format!("{n:?} is not an interface name (1 to 15 letters, digits, '.', '_', '-')"),
            ));
        }
        Ok(())
    };
    for (i, itf) in p.interfaces.iter().enumerate() {
        let field = format!("interfaces[{i}]");
        name(format!("{field}.name"), &itf.name)?;
        if !names.insert(&itf.name) {
            return Err(Invalid::new(
                format!("{field}.name"),
                format!("{:?} is used twice", itf.name),
            ));
        }
        if let Some(m) = &itf.mac {
            mac_ok(m).map_err(|e| Invalid::new(format!("{field}.mac"), e))?;
            if let Some(other) = macs.insert(m.to_ascii_lowercase(), field.clone()) {
                return Err(Invalid::new(
                    format!("{field}.mac"),
                    format!("{m} is already the MAC of {other}"),
                ));
            }
        }
        addressing(&field, &itf.ip, itf.mtu, &mut seen)?;
    }
    let mut in_bond: BTreeMap<&str, &str> = BTreeMap::new();
    const MODES: [&str; 7] = [
        "balance-rr",
        "active-backup",
        "balance-xor",
        "broadcast",
        "802.3ad",
        "balance-tlb",
        "balance-alb",
    ];
    for (i, b) in p.bonds.iter().enumerate() {
        let field = format!("bonds[{i}]");
        name(format!("{field}.name"), &b.name)?;
        if !names.insert(&b.name) {
            return Err(Invalid::new(
                format!("{field}.name"),
                format!("{:?} is used twice", b.name),
            ));
        }
        if !MODES.contains(&b.mode.as_str()) {
            return Err(Invalid::new(
                format!("{field}.mode"),
                format!("{:?} is not a bond mode ({})", b.mode, MODES.join(", ")),
            ));
        }
        if b.members.is_empty() {
            return Err(Invalid::new(
                format!("{field}.members"),
                "a bond needs members",
            ));
        }
        for (j, m) in b.members.iter().enumerate() {
            let f = format!("{field}.members[{j}]");
            let Some(itf) = p.interfaces.iter().find(|x| &x.name == m) else {
                return Err(Invalid::new(
                    f,
                    format!("{m:?} is not one of the interfaces"),
                ));
            };
            if let Some(other) = in_bond.insert(m, &b.name) {
                return Err(Invalid::new(
                    f,
                    format!("{m:?} is already in bond {other:?}"),
                ));
            }
            if !itf.ip.addresses.is_empty() || itf.ip.dhcp4 || itf.ip.dhcp6 {
                return Err(Invalid::new(
                    f,
                    format!("{m:?} has addressing of its own; a bond member may not"),
                ));
            }
        }
        addressing(&field, &b.ip, b.mtu, &mut seen)?;
    }
    let mut vlan_ids: BTreeMap<(&str, u16), String> = BTreeMap::new();
    for (i, v) in p.vlans.iter().enumerate() {
        let field = format!("vlans[{i}]");
        if let Some(bond) = in_bond.get(v.link.as_str()) {
            return Err(Invalid::new(
                format!("{field}.link"),
                format!(
                    "{:?} is a member of bond {bond:?}; put the VLAN on the bond",
                    v.link
                ),
            ));
        }
        if let Some(other) = vlan_ids.insert((v.link.as_str(), v.id), field.clone()) {
            return Err(Invalid::new(
                format!("{field}.id"),
                format!("VLAN {} on {:?} is already {other}", v.id, v.link),
            ));
        }
        name(format!("{field}.name"), &v.name)?;
        if !names.insert(&v.name) {
            return Err(Invalid::new(
                format!("{field}.name"),
                format!("{:?} is used twice", v.name),
            ));
        }
        if !(1..=4094).contains(&v.id) {
            return Err(Invalid::new(
                format!("{field}.id"),
                format!("{} is not a VLAN id (1 to 4094)", v.id),
            ));
        }
        let link_ok = p.interfaces.iter().any(|x| x.name == v.link)
            || p.bonds.iter().any(|x| x.name == v.link);
        if !link_ok {
            return Err(Invalid::new(
                format!("{field}.link"),
                format!("{:?} is not one of the interfaces or bonds", v.link),
            ));
        }
        addressing(&field, &v.ip, v.mtu, &mut seen)?;
    }
    dns("dns", &p.dns)?;
    for (i, k) in p.ssh_authorized_keys.iter().enumerate() {
        ssh_key_ok(k).map_err(|m| Invalid::new(format!("ssh_authorized_keys[{i}]"), m))?;
    }
    if let Some(u) = &p.user {
        if !user_name_ok(&u.name) {
            return Err(Invalid::new(
                "user.name",
                format!(
                    "{:?} is not a user name (lower-case letters, digits, '_', '-'; at most 32)",
                    u.name
                ),
            ));
        }
        password_hash_ok(&u.password_hash).map_err(|m| Invalid::new("user.password_hash", m))?;
    }
    if let Some(extra) = &p.cloud_config {
        for owned in [
            "hostname",
            "fqdn",
            "ssh_authorized_keys",
            "users",
            "preserve_hostname",
        ] {
            if extra.contains_key(owned) {
                return Err(Invalid::new(
                    format!("cloud_config.{owned}"),
                    "is set by the personality's own fields; set it there",
                ));
            }
        }
    }
    Ok(())
}
