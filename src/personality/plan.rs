//! Deployment plans (issue 22): many servers' volumes and personalities from one file.
//!
//! A plan names a golden image, personality fields every server shares (`defaults`), and the
//! servers: each a volume name and the fields that are its own, or, with `count`, a run of
//! servers made from templates (`web-{index:02}`, `52:54:00:00:01:{index:02x}`). Expanding a
//! plan gives one [`Server`] per volume, each personality checked alone; the node checks them
//! again, together and against what it already holds, before it creates any (`node/deploy.rs`).
//!
//! ```toml
//! image = "debian-12"
//! [defaults]
//! fqdn = "{hostname}.rack1.example.com"
//! ssh_authorized_keys = ["ssh-ed25519 AAAA... ops"]
//! [[defaults.interfaces]]
//! name = "eno1"
//! addresses = ["pool:rack1"]
//!
//! [[servers]]
//! name = "web-{index:02}"
//! count = 20
//! [[servers.interfaces]]
//! name = "eno1"
//! mac = "52:54:00:00:01:{index:02x}"
//! ```
//!
//! The plan is outside input: it is refused with the entry, the field and the value named, and
//! no amount of it can make the parser panic or allocate without bound (`fuzz/plan`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Invalid, Personality};

/// At most this many servers in one plan (after `count`s are expanded).
pub const MAX_SERVERS: u64 = 10_000;

/// At most this much personality data in one expanded plan (a typical server's takes about
/// 1 KiB): a short plan of large defaults and a large count must not exhaust the node's memory.
pub const MAX_EXPANDED_BYTES: usize = 64 << 20;

/// The largest `defaults` table (a stored personality may take 64 KiB).
const MAX_DEFAULTS_BYTES: usize = 64 << 10;

/// Keys of a server entry that belong to the plan, not to the personality.
const SERVER_KEYS: [&str; 5] = ["name", "count", "start", "image", "size"];

/// One server of an expanded plan: a volume to create (or bring up to date) with its
/// personality.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Where it came from in the plan (`servers[2]`, or `servers[2] #5` for the fifth of a run).
    pub entry: String,
    /// The volume's name.
    pub name: String,
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    pub personality: Box<Personality>,
}

/// An entry that could not be made into a server, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bad {
    pub entry: String,
    /// The volume's name, when it got that far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub error: String,
}

/// A plan expanded: the servers whose entries are good, and the bad entries.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Plan {
    pub servers: Vec<Server>,
    pub bad: Vec<Bad>,
}

/// Parses and expands a plan: TOML, or JSON when it starts with `{`. An error here is the
/// whole file's (it cannot be read, or its top level is wrong); a bad server entry is listed in
/// [`Plan::bad`] with the others expanded.
pub fn parse(text: &str) -> Result<Plan, Invalid> {
    let doc: Value = if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| Invalid::new("", e.to_string()))?
    } else {
        let t: toml::Table =
            toml::from_str(text).map_err(|e| Invalid::new("", e.to_string().trim_end()))?;
        serde_json::to_value(t).map_err(|e| Invalid::new("", e.to_string()))?
    };
    let Value::Object(mut top) = doc else {
        return Err(Invalid::new(
            "",
            "a plan is a table of image, size, defaults and servers",
        ));
    };
    let image = match top.remove("image") {
        None => None,
        Some(Value::String(s)) => Some(s),
        Some(v) => {
            return Err(Invalid::new(
                "image",
                format!("{} is not an image name", cut_json(&v)),
            ));
        }
    };
    let size = top
        .remove("size")
        .map(|v| size_of("size", &v))
        .transpose()?;
    let defaults = match top.remove("defaults") {
        None => Map::new(),
        Some(Value::Object(m)) => m,
        Some(v) => {
            return Err(Invalid::new(
                "defaults",
                format!("{} is not a table", cut_json(&v)),
            ));
        }
    };
    if Value::Object(defaults.clone()).to_string().len() > MAX_DEFAULTS_BYTES {
        return Err(Invalid::new(
            "defaults",
            format!("larger than the {MAX_DEFAULTS_BYTES} bytes a personality may take"),
        ));
    }
    if let Some(k) = defaults.keys().find(|k| SERVER_KEYS.contains(&k.as_str())) {
        return Err(Invalid::new(
            format!("defaults.{k}"),
            "belongs in a server entry (or at the top of the plan: image, size)",
        ));
    }
    let servers = match top.remove("servers") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) | None => {
            return Err(Invalid::new("servers", "the plan names no servers"));
        }
        Some(v) => {
            return Err(Invalid::new(
                "servers",
                format!("{} is not a list", cut_json(&v)),
            ));
        }
    };
    if let Some(k) = top.keys().next() {
        return Err(Invalid::new(
            k.as_str(),
            "unknown key (a plan has image, size, defaults and servers)",
        ));
    }
    let mut plan = Plan::default();
    let mut total: u64 = 0;
    let mut expanded: usize = 0;
    for (i, s) in servers.into_iter().enumerate() {
        let entry = format!("servers[{i}]");
        let Value::Object(s) = s else {
            plan.bad.push(Bad {
                entry,
                name: None,
                error: "a server entry is a table".into(),
            });
            continue;
        };
        let run = match Run::of(&s, &entry) {
            Ok(r) => r,
            Err(e) => {
                plan.bad.push(Bad {
                    entry,
                    name: None,
                    error: e.to_string(),
                });
                continue;
            }
        };
        total = total.saturating_add(run.count);
        if total > MAX_SERVERS {
            return Err(Invalid::new(
                entry,
                format!("the plan names more than {MAX_SERVERS} servers"),
            ));
        }
        for n in 0..run.count {
            let index = run.start.saturating_add(n);
            let entry = if run.count > 1 {
                format!("{entry} #{}", n + 1)
            } else {
                entry.clone()
            };
            match server(&s, &defaults, &image, size, index, &entry) {
                Ok(srv) => {
                    expanded += serde_json::to_string(&srv.personality).map_or(0, |s| s.len());
                    if expanded > MAX_EXPANDED_BYTES {
                        return Err(Invalid::new(
                            entry,
                            format!(
                                "the plan expands to more than {} MiB of personalities",
                                MAX_EXPANDED_BYTES >> 20
                            ),
                        ));
                    }
                    plan.servers.push(srv)
                }
                Err((name, e)) => plan.bad.push(Bad {
                    entry,
                    name,
                    error: e.to_string(),
                }),
            }
        }
    }
    plan.refuse_twice();
    Ok(plan)
}

impl Plan {
    /// Two servers with one volume name or one MAC address: both are bad (neither can be
    /// told from the other). Addresses are checked by the node, which also knows the volumes
    /// already there and hands out pool addresses.
    fn refuse_twice(&mut self) {
        let mut names: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        let mut macs: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, s) in self.servers.iter().enumerate() {
            names.entry(&s.name).or_default().push(i);
            for itf in &s.personality.interfaces {
                if let Some(m) = &itf.mac {
                    macs.entry(m.to_ascii_lowercase()).or_default().push(i);
                }
            }
        }
        let mut why: BTreeMap<usize, String> = BTreeMap::new();
        for (name, at) in names.iter().filter(|(_, at)| at.len() > 1) {
            for &i in at {
                why.entry(i).or_insert_with(|| {
                    format!(
                        "volume name {name:?} is given to {} servers: {}",
                        at.len(),
                        self.entries(at)
                    )
                });
            }
        }
        for (mac, at) in macs.iter() {
            let mut servers = at.clone();
            servers.dedup();
            if servers.len() < 2 {
                continue;
            }
            for &i in &servers {
                why.entry(i).or_insert_with(|| {
                    format!(
                        "MAC address {mac} is given to {} servers: {}",
                        servers.len(),
                        self.entries(&servers)
                    )
                });
            }
        }
        for (i, error) in why.into_iter().rev() {
            let s = self.servers.remove(i);
            self.bad.push(Bad {
                entry: s.entry,
                name: Some(s.name),
                error,
            });
        }
        self.bad.sort_by_key(|b| entry_order(&b.entry));
    }

    fn entries(&self, at: &[usize]) -> String {
        let shown: Vec<String> = at
            .iter()
            .take(4)
            .map(|&i| format!("{} ({})", self.servers[i].entry, self.servers[i].name))
            .collect();
        let more = if at.len() > 4 { ", ..." } else { "" };
        format!("{}{more}", shown.join(", "))
    }
}

/// `servers[12] #3` sorts after `servers[2] #10` and before `servers[12] #10`.
pub fn entry_order(e: &str) -> (u64, u64) {
    let num = |s: &str| -> u64 {
        s.chars()
            .filter(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or(0)
    };
    match e.split_once(" #") {
        Some((a, b)) => (num(a), num(b)),
        None => (num(e), 0),
    }
}

/// A server entry's `count` and `start`: the run of indexes its templates see.
struct Run {
    count: u64,
    start: u64,
}

impl Run {
    fn of(s: &Map<String, Value>, entry: &str) -> Result<Run, Invalid> {
        let int = |key: &str, min: u64, default: u64| -> Result<u64, Invalid> {
            match s.get(key) {
                None => Ok(default),
                Some(v) => v.as_u64().filter(|n| *n >= min).ok_or_else(|| {
                    Invalid::new(
                        format!("{entry}.{key}"),
                        format!("{} is not a whole number of at least {min}", cut_json(v)),
                    )
                }),
            }
        };
        Ok(Run {
            count: int("count", 1, 1)?,
            start: int("start", 0, 1)?,
        })
    }
}

fn size_of(field: &str, v: &Value) -> Result<u64, Invalid> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| Invalid::new(field, format!("{n} is not a size in bytes"))),
        Value::String(s) => parse_size::Config::new()
            .with_binary()
            .parse_size(s)
            .map_err(|e| Invalid::new(field, format!("{} is not a size ({e}; e.g. 20G)", cut(s)))),
        v => Err(Invalid::new(
            field,
            format!("{} is not a size (e.g. 20G)", cut_json(v)),
        )),
    }
}

/// Server `index` of entry `s`: the defaults with the entry's own fields over them, every
/// template filled in, checked. On error, the volume name if it was made.
fn server(
    s: &Map<String, Value>,
    defaults: &Map<String, Value>,
    image: &Option<String>,
    size: Option<u64>,
    index: u64,
    entry: &str,
) -> Result<Server, (Option<String>, Invalid)> {
    let at = |f: &str| format!("{entry}.{f}");
    let no_name = |e: Invalid| (None, e);
    let name = match s.get("name") {
        Some(Value::String(n)) => {
            fill(n, &Vars::index(index)).map_err(|e| Invalid::new(at("name"), e))
        }
        Some(v) => Err(Invalid::new(
            at("name"),
            format!("{} is not a volume name", cut_json(v)),
        )),
        None => Err(Invalid::new(at("name"), "every server needs a volume name")),
    }
    .map_err(no_name)?;
    // Checked before it fills other templates (`{name}`): a bounded, usable name.
    crate::names::validate_name(&name).map_err(|e| no_name(Invalid::new(at("name"), e)))?;
    let named = |e: Invalid| (Some(name.clone()), e);
    let image = match s.get("image") {
        None => image.clone(),
        Some(Value::String(i)) => Some(i.clone()),
        Some(v) => {
            return Err(named(Invalid::new(
                at("image"),
                format!("{} is not an image name", cut_json(v)),
            )));
        }
    };
    let size = match s.get("size") {
        None => size,
        Some(v) => Some(size_of(&at("size"), v).map_err(named)?),
    };
    let mut fields = Value::Object(defaults.clone());
    let own: Map<String, Value> = s
        .iter()
        .filter(|(k, _)| !SERVER_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    merge(&mut fields, Value::Object(own));
    let Value::Object(mut fields) = fields else {
        unreachable!("a table merged into a table")
    };
    let mut vars = Vars::index(index);
    vars.name = Some(name.clone());
    let hostname = match fields.remove("hostname") {
        None => name.clone(),
        Some(Value::String(h)) => {
            fill(&h, &vars).map_err(|e| named(Invalid::new(at("hostname"), e)))?
        }
        Some(v) => {
            return Err(named(Invalid::new(
                at("hostname"),
                format!("{} is not a host name", cut_json(&v)),
            )));
        }
    };
    if hostname.len() > 63 {
        return Err(named(Invalid::new(
            at("hostname"),
            format!(
                "{} is longer than a host name's 63 characters",
                cut(&hostname)
            ),
        )));
    }
    vars.hostname = Some(hostname.clone());
    let mut fields = Value::Object(fields);
    fill_all(&mut fields, &vars, &mut entry.to_string()).map_err(named)?;
    if let Value::Object(m) = &mut fields {
        m.insert("hostname".into(), Value::String(hostname));
    }
    let personality: Personality = serde_path_to_error::deserialize(fields).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            entry.to_string()
        } else {
            format!("{entry}.{path}")
        };
        named(Invalid::new(field, e.into_inner().to_string()))
    })?;
    if !personality.instance_id.is_empty() {
        return Err(named(Invalid::new(
            at("instance_id"),
            "is set by the node, not by a plan",
        )));
    }
    personality
        .validate()
        .map_err(|e| named(Invalid::new(format!("{entry}.{}", e.field), e.message)))?;
    Ok(Server {
        entry: entry.to_string(),
        name,
        image,
        size,
        personality: Box::new(personality),
    })
}

/// Lays `over` onto `base`: tables merge key by key; lists of tables that all have a `name`
/// (interfaces, bonds, VLANs) merge entry by entry by name, new names appended; anything else
/// in `over` replaces what `base` had.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(old) => merge(old, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(o)) if named_tables(b) && named_tables(&o) => {
            for v in o {
                let name = v.get("name").cloned();
                match b.iter_mut().find(|x| x.get("name") == name.as_ref()) {
                    Some(old) => merge(old, v),
                    None => b.push(v),
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn named_tables(a: &[Value]) -> bool {
    a.iter()
        .all(|v| v.get("name").is_some_and(Value::is_string))
}

/// `s` for an error message: quoted, and cut to its first 48 characters (a plan's values may
/// be megabytes long, and a thousand bad entries must not make a gigabyte of messages).
fn cut(s: &str) -> String {
    match s.char_indices().nth(48) {
        None => format!("{s:?}"),
        Some((at, _)) => format!("{:?}...", &s[..at]),
    }
}

/// A plan's value for an error message, as JSON, cut like [`cut`].
fn cut_json(v: &Value) -> String {
    let t = v.to_string();
    match t.char_indices().nth(48) {
        None => t,
        Some((at, _)) => format!("{}...", &t[..at]),
    }
}

/// What a template may name: `{index}` always, `{name}` once the volume's name is made,
/// `{hostname}` once the host name is.
#[derive(Debug, Clone, Default)]
pub struct Vars {
    pub index: u64,
    pub name: Option<String>,
    pub hostname: Option<String>,
}

impl Vars {
    fn index(index: u64) -> Vars {
        Vars {
            index,
            ..Vars::default()
        }
    }
}

/// Fills the templates of every string in `v` (keys stay as they are), naming the field of a
/// bad one by its path.
fn fill_all(v: &mut Value, vars: &Vars, path: &mut String) -> Result<(), Invalid> {
    match v {
        Value::String(s) => {
            *s = fill(s, vars).map_err(|e| Invalid::new(path.clone(), e))?;
        }
        Value::Array(a) => {
            for (i, x) in a.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                fill_all(x, vars, path)?;
                path.truncate(len);
            }
        }
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                fill_all(x, vars, path)?;
                path.truncate(len);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    Ok(())
}

/// Fills one template: `{index}`, with arithmetic (`+N`, `-N`, `*N`, `/N`, `%N`, left to right),
/// optionally formatted as `:W` (at least W digits, zero-padded when W starts with 0) and
/// `x`/`X` (hexadecimal), e.g. `{index+100}`, `{index:02}`,
/// `52:54:00:00:{index/256:02x}:{index%256:02x}`; `{name}`, `{hostname}`. `{{` and `}}` stand
/// for a brace.
pub fn fill(t: &str, vars: &Vars) -> Result<String, String> {
    let mut out = String::with_capacity(t.len());
    let mut rest = t;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let (c, after) = (rest.as_bytes()[i], &rest[i + 1..]);
        if after.as_bytes().first() == Some(&c) {
            out.push(char::from(c));
            rest = &after[1..];
            continue;
        }
        if c == b'}' {
            return Err(format!(
                "{}: a '}}' closes no template (write '}}}}' for a brace)",
                cut(t)
            ));
        }
        let Some(end) = after.find('}') else {
            return Err(format!(
                "{}: a '{{' opens a template that never closes (write '{{{{' for a brace)",
                cut(t)
            ));
        };
        out.push_str(&one(&after[..end], vars).map_err(|e| format!("{}: {e}", cut(t)))?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The value of one `{...}`.
fn one(spec: &str, vars: &Vars) -> Result<String, String> {
    let (var, format) = match spec.split_once(':') {
        Some((v, f)) => (v, Some(f)),
        None => (spec, None),
    };
    let known = "templates name {index} (also {index+N}, {index/256}, {index:03}, \
                 {index%256:02x}), {name} and {hostname}; write '{{' for a brace";
    let text = |v: &Option<String>, what: &str| -> Result<String, String> {
        if format.is_some() {
            return Err(format!("{{{}}}: only {{index}} takes a format", cut(spec)));
        }
        v.clone()
            .ok_or_else(|| format!("{{{what}}} cannot be used here (it is not made yet)"))
    };
    match var {
        "name" => return text(&vars.name, "name"),
        "hostname" => return text(&vars.hostname, "hostname"),
        _ => {}
    }
    let offset = var
        .strip_prefix("index")
        .ok_or_else(|| format!("{{{}}}: unknown; {known}", cut(spec)))?;
    // Arithmetic, left to right: `+N`, `-N`, `*N`, `/N`, `%N`.
    let mut value = i128::from(vars.index);
    let mut ops = offset;
    while let Some(op) = ops.chars().next() {
        if !"+-*/%".contains(op) {
            return Err(format!("{{{}}}: unknown; {known}", cut(spec)));
        }
        let rest = &ops[1..]; // `op` is one of five ASCII characters
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let digits = &rest[..end];
        let n = i128::from(
            digits
                .parse::<u32>()
                .map_err(|_| format!("{{{}}}: {op} takes a whole number below 2^32", cut(spec)))?,
        );
        value = match op {
            '+' => value.checked_add(n),
            '-' => value.checked_sub(n),
            '*' => value.checked_mul(n),
            '/' => value.checked_div(n),
            _ => value.checked_rem(n),
        }
        .ok_or_else(|| format!("{{{}}}: too large, or a division by zero", cut(spec)))?;
        ops = &rest[end..];
    }
    let value = u64::try_from(value)
        .map_err(|_| format!("{{{}}} is out of range for index {}", cut(spec), vars.index))?;
    let Some(f) = format else {
        return Ok(value.to_string());
    };
    let (digits, hex) = match f.strip_suffix('x') {
        Some(d) => (d, Some(false)),
        None => match f.strip_suffix('X') {
            Some(d) => (d, Some(true)),
            None => (f, None),
        },
    };
    if !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 2 {
        return Err(format!(
            "{{{}}}: the format is a width and x or X for hexadecimal (e.g. :03, :02x)",
            cut(spec)
        ));
    }
    let width: usize = if digits.is_empty() {
        0
    } else {
        digits.parse().expect("digits")
    };
    let zero = digits.starts_with('0');
    Ok(match (hex, zero) {
        (None, true) => format!("{value:0width$}"),
        (None, false) => format!("{value:width$}"),
        (Some(false), true) => format!("{value:0width$x}"),
        (Some(false), false) => format!("{value:width$x}"),
        (Some(true), true) => format!("{value:0width$X}"),
        (Some(true), false) => format!("{value:width$X}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str = r#"
image = "debian-12"
size = "20G"

[defaults]
fqdn = "{hostname}.rack1.example.com"
ssh_authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE8Fu1z0YfwYfB5G0x7aJrX6y7XnX5h0kQkY0vF2qJ4m ops"]
[defaults.dns]
servers = ["10.0.0.53"]
[[defaults.interfaces]]
name = "eno1"
addresses = ["pool:rack1"]

[[servers]]
name = "web-{index:02}"
count = 3
start = 9
[[servers.interfaces]]
name = "eno1"
mac = "52:54:00:00:01:{index:02x}"

[[servers]]
name = "db-01"
image = "debian-11"
hostname = "database"
[[servers.interfaces]]
name = "eno1"
mac = "52:54:00:00:02:01"
addresses = ["10.0.0.{index+49}/24"]
gateway = "10.0.0.1"
[[servers.interfaces]]
name = "eno2"
dhcp4 = true
"#;

    #[test]
    fn a_plan_expands_into_servers() {
        let p = parse(PLAN).unwrap();
        assert_eq!(p.bad, vec![]);
        let names: Vec<&str> = p.servers.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web-09", "web-10", "web-11", "db-01"]);
        let w = &p.servers[1];
        assert_eq!(w.entry, "servers[0] #2");
        assert_eq!(w.image.as_deref(), Some("debian-12"));
        assert_eq!(w.size, Some(20 << 30));
        assert_eq!(w.personality.hostname, "web-10");
        assert_eq!(
            w.personality.fqdn.as_deref(),
            Some("web-10.rack1.example.com")
        );
        assert_eq!(w.personality.interfaces.len(), 1);
        let eno1 = &w.personality.interfaces[0];
        assert_eq!(eno1.mac.as_deref(), Some("52:54:00:00:01:0a"));
        assert_eq!(eno1.ip.addresses, ["pool:rack1"]);
        assert_eq!(w.personality.dns.servers.len(), 1);
        let d = &p.servers[3];
        assert_eq!(d.image.as_deref(), Some("debian-11"));
        assert_eq!(d.personality.hostname, "database");
        assert_eq!(
            d.personality.fqdn.as_deref(),
            Some("database.rack1.example.com")
        );
        // The server's eno1 replaced the default's addresses; eno2 was added.
        let i = &d.personality.interfaces;
        assert_eq!(i.len(), 2);
        assert_eq!(i[0].ip.addresses, ["10.0.0.50/24"]);
        assert_eq!(i[1].name, "eno2");
        assert!(i[1].ip.dhcp4);
    }

    #[test]
    fn templates() {
        let v = Vars {
            index: 7,
            name: Some("web-07".into()),
            hostname: None,
        };
        assert_eq!(fill("a{index}b", &v).unwrap(), "a7b");
        assert_eq!(fill("{index:03}", &v).unwrap(), "007");
        assert_eq!(fill("{index+250:02x}", &v).unwrap(), "101");
        assert_eq!(fill("{index+8:02X}", &v).unwrap(), "0F");
        assert_eq!(fill("{index-7}", &v).unwrap(), "0");
        let mac = "{index/256:02x}:{index%256:02x}";
        let v300 = Vars {
            index: 300,
            ..Vars::default()
        };
        assert_eq!(fill(mac, &v300).unwrap(), "01:2c");
        assert_eq!(fill("{index*2+1}", &v).unwrap(), "15");
        assert_eq!(fill("{{x}} {name}", &v).unwrap(), "{x} web-07");
        for bad in [
            "{index-8}",
            "{nam}",
            "{hostname}",
            "{name:02}",
            "{index:2y}",
            "{index:123}",
            "{index+}",
            "{index/0}",
            "{indexé}",
            "{index+1é}",
            "{index*4294967295*4294967295*4294967295*4294967295*4294967295}",
            "{index%}",
            "{index^2}",
            "{index+99999999999}",
            "{index+99999999999999999999999}",
            "a}b",
            "a{b",
            "${HOME}",
        ] {
            assert!(fill(bad, &v).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_entries_are_named_and_the_good_ones_kept() {
        let text = r#"
image = "img"
[[servers]]
name = "ok-1"
[[servers]]
name = "bad_host"
[[servers]]
name = "x-{index}"
count = 2
[[servers.interfaces]]
name = "eno1"
mac = "52:54:00:00:00:01"
[[servers]]
name = "y"
hostnme = "typo"
[[servers]]
name = "z"
[[servers.interfaces]]
name = "eno1"
addresses = ["10.0.0.300/24"]
[[servers]]
name = "ok-1"
hostname = "other"
[[servers]]
count = 0
"#;
        let p = parse(text).unwrap();
        let names: Vec<&str> = p.servers.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, Vec::<&str>::new());
        let bad: Vec<(&str, &str)> = p
            .bad
            .iter()
            .map(|b| (b.entry.as_str(), b.error.as_str()))
            .collect();
        assert_eq!(bad.len(), 8, "{bad:#?}");
        assert!(bad[0].0 == "servers[0]" && bad[0].1.contains("\"ok-1\" is given to 2"));
        assert!(
            bad[1].0 == "servers[1]" && bad[1].1.starts_with("servers[1].hostname: \"bad_host\"")
        );
        assert!(bad[2].0 == "servers[2] #1" && bad[2].1.contains("MAC address 52:54:00:00:00:01"));
        assert!(bad[3].0 == "servers[2] #2");
        assert!(bad[4].1.contains("unknown field `hostnme`"), "{}", bad[4].1);
        assert!(
            bad[5]
                .1
                .starts_with("servers[4].interfaces[0].addresses[0]: \"10.0.0.300/24\"")
        );
        assert!(bad[6].0 == "servers[5]");
        assert!(bad[7].1.contains("servers[6].count"));
    }

    #[test]
    fn whole_file_errors() {
        for (text, says) in [
            ("image = ", "expected"),
            ("image = \"a\"", "names no servers"),
            ("servers = []", "names no servers"),
            ("imagex = 1\n[[servers]]\nname='a'", "unknown key"),
            ("size = \"lots\"\n[[servers]]\nname='a'", "is not a size"),
            (
                "[defaults]\nname = 'a'\n[[servers]]\nname='a'",
                "belongs in a server",
            ),
            (
                "[[servers]]\nname='a-{index}'\ncount=10001",
                "more than 10000",
            ),
            ("[[servers]]\nname='a'\n[1]", "unknown key"),
            ("servers = 'a'", "not a list"),
            ("{\"servers\": 3}", "not a list"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn json_plans_too() {
        let p = parse(r#"{"image": "i", "servers": [{"name": "a", "hostname": "h"}]}"#).unwrap();
        assert_eq!(p.servers[0].personality.hostname, "h");
        assert_eq!(p.servers[0].image.as_deref(), Some("i"));
    }
}
