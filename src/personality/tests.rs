use serde_json::{Value, json};

use super::*;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGqT0Vb5Q6p0n0Jw9cQ2x1y2z3a4b5c6d7e8f9g0h1i2 ops@example";
const HASH: &str = "$6$rounds=4096$saltsalt$3MEaFFq3YtJ4ExzvYPtTGlU3CxTtHpPHyk8Fj1tQgnhVvVnSf5Q9M0R3xGK9o2d1vM0Zr0rFPA8nWYQy4vQZ/";

const FULL: &str = r#"
hostname = "web-01"
fqdn = "web-01.rack1.example.com"
ssh_authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGqT0Vb5Q6p0n0Jw9cQ2x1y2z3a4b5c6d7e8f9g0h1i2 ops@example"]

[dns]
servers = ["10.0.0.53", "10.0.1.53"]
search = ["rack1.example.com"]

[[interfaces]]
name = "eno1"
mac = "52:54:00:AA:00:01"

[[interfaces]]
name = "eno2"
mac = "52:54:00:aa:00:02"

[[interfaces]]
name = "mgmt0"
mac = "52:54:00:aa:00:03"
addresses = ["192.168.50.11/24"]
mtu = 1500

[[bonds]]
name = "bond0"
members = ["eno1", "eno2"]
mode = "802.3ad"
addresses = ["10.0.0.11/24"]
gateway = "10.0.0.1"
mtu = 9000

[[vlans]]
name = "bond0.200"
id = 200
link = "bond0"
addresses = ["10.20.0.11/24", "2001:db8:20::11/64"]
"#;

#[test]
fn a_full_personality_parses_validates_and_renders_nocloud() {
    let mut p = Personality::parse(FULL).unwrap();
    p.instance_id = "i-1".into();
    assert_eq!(p.addresses().len(), 4);
    let n = p.nocloud();
    let meta: Value = serde_json::from_str(&n.meta_data).unwrap();
    assert_eq!(
        meta,
        json!({"instance-id": "i-1", "local-hostname": "web-01"})
    );
    let user_body = n.user_data.strip_prefix("#cloud-config\n").expect("header");
    let user: Value = serde_json::from_str(user_body).unwrap();
    assert_eq!(user["hostname"], "web-01");
    assert_eq!(user["fqdn"], "web-01.rack1.example.com");
    assert_eq!(user["ssh_authorized_keys"][0], KEY);
    let net: Value = serde_json::from_str(&n.network_config).unwrap();
    assert_eq!(net["version"], 2);
    assert_eq!(
        net["ethernets"]["eno1"]["match"]["macaddress"], "52:54:00:aa:00:01",
        "MACs are written lower-case"
    );
    assert_eq!(net["ethernets"]["eno1"]["set-name"], "eno1");
    assert_eq!(
        net["ethernets"]["mgmt0"]["addresses"][0],
        "192.168.50.11/24"
    );
    assert_eq!(
        net["ethernets"]["mgmt0"]["nameservers"]["addresses"],
        json!(["10.0.0.53", "10.0.1.53"])
    );
    assert_eq!(net["bonds"]["bond0"]["interfaces"], json!(["eno1", "eno2"]));
    assert_eq!(net["bonds"]["bond0"]["parameters"]["mode"], "802.3ad");
    assert_eq!(
        net["bonds"]["bond0"]["routes"],
        json!([{"to": "0.0.0.0/0", "via": "10.0.0.1"}])
    );
    assert_eq!(net["bonds"]["bond0"]["mtu"], 9000);
    assert_eq!(net["vlans"]["bond0.200"]["id"], 200);
    assert_eq!(net["vlans"]["bond0.200"]["link"], "bond0");
    // Members carry no addressing of their own.
    assert!(net["ethernets"]["eno1"].get("addresses").is_none());
}

#[test]
fn a_json_personality_with_dhcp_and_a_user_renders_too() {
    let text = json!({
        "hostname": "db-7",
        "interfaces": [{"name": "eth0", "dhcp4": true}],
        "user": {"name": "admin", "password_hash": HASH},
        "cloud_config": {"packages": ["htop"], "timezone": "UTC"},
    })
    .to_string();
    let p = Personality::parse(&text).unwrap();
    let n = p.nocloud();
    let user: Value =
        serde_json::from_str(n.user_data.strip_prefix("#cloud-config\n").unwrap()).unwrap();
    assert_eq!(user["users"][1]["name"], "admin");
    assert_eq!(user["users"][1]["passwd"], HASH);
    assert_eq!(user["packages"], json!(["htop"]), "cloud_config merged in");
    let net: Value = serde_json::from_str(&n.network_config).unwrap();
    assert_eq!(net["ethernets"]["eth0"]["dhcp4"], true);
    assert!(
        net["ethernets"]["eth0"].get("match").is_none(),
        "matched by name"
    );
}

/// Each bad input is refused with the field's path and the value in the message.
#[test]
fn bad_fields_are_refused_by_name_and_value() {
    let base = |extra: &str| format!("hostname = \"web-01\"\n{extra}");
    let cases: Vec<(String, &str, &str)> = vec![
        ("hostname = \"web_01\"".into(), "hostname", "web_01"),
        ("hostname = \"-web\"".into(), "hostname", "-web"),
        (
            "hostname = \"web-01\"\nfqdn = \"db-01.example.com\"".into(),
            "fqdn",
            "does not begin with the hostname",
        ),
        (
            base("[[interfaces]]\nname = \"eth0\"\naddresses = [\"10.0.0.300/24\"]"),
            "interfaces[0].addresses[0]",
            "10.0.0.300/24",
        ),
        (
            base("[[interfaces]]\nname = \"eth0\"\naddresses = [\"10.0.0.5/33\"]"),
            "interfaces[0].addresses[0]",
            "prefix must be 1 to 32",
        ),
        (
            base("[[interfaces]]\nname = \"eth0\"\naddresses = [\"10.0.0.0/24\"]"),
            "interfaces[0].addresses[0]",
            "network or broadcast",
        ),
        (
            base("[[interfaces]]\nname = \"eth0\"\nmac = \"52:54:00:zz:00:01\""),
            "interfaces[0].mac",
            "52:54:00:zz:00:01",
        ),
        (
            base("[[interfaces]]\nname = \"eth0\"\nmac = \"01:00:5e:00:00:01\""),
            "interfaces[0].mac",
            "multicast",
        ),
        (
            base(
                "[[interfaces]]\nname = \"eth0\"\naddresses = [\"10.0.0.5/24\"]\ngateway = \"10.1.0.1\"",
            ),
            "interfaces[0].gateway",
            "10.1.0.1 is in none of this link's subnets",
        ),
        (
            base(
                "[[interfaces]]\nname = \"eth0\"\naddresses = [\"10.0.0.5/24\"]\n\
                 [[interfaces]]\nname = \"eth1\"\naddresses = [\"10.0.0.5/24\"]",
            ),
            "interfaces[1].addresses[0]",
            "already the address of interfaces[0].addresses[0]",
        ),
        (
            base("[[interfaces]]\nname = \"an-interface-name-too-long\""),
            "interfaces[0].name",
            "an-interface-name-too-long",
        ),
        (
            base("[[interfaces]]\nname = \"eth0\"\naddresses = [\"2001:db8::5/64\"]\nmtu = 1000"),
            "interfaces[0].mtu",
            "1000 is outside 1280 to 9216",
        ),
        (
            base("[[bonds]]\nname = \"bond0\"\nmembers = [\"eth9\"]\nmode = \"802.3ad\""),
            "bonds[0].members[0]",
            "\"eth9\" is not one of the interfaces",
        ),
        (
            base(
                "[[interfaces]]\nname = \"eth0\"\n[[bonds]]\nname = \"bond0\"\nmembers = [\"eth0\"]\nmode = \"fastest\"",
            ),
            "bonds[0].mode",
            "fastest",
        ),
        (
            base(
                "[[interfaces]]\nname = \"eth0\"\n[[vlans]]\nname = \"v5000\"\nid = 4095\nlink = \"eth0\"",
            ),
            "vlans[0].id",
            "4095",
        ),
        (
            base("ssh_authorized_keys = [\"hunter2\"]"),
            "ssh_authorized_keys[0]",
            "hunter2",
        ),
        (
            base("[user]\nname = \"admin\"\npassword_hash = \"hunter2\""),
            "user.password_hash",
            "never stored in clear",
        ),
        (
            base("[cloud_config]\nhostname = \"other\""),
            "cloud_config.hostname",
            "set it there",
        ),
        (
            base("[dns]\nsearch = [\"bad domain\"]"),
            "dns.search[0]",
            "bad domain",
        ),
        (base("hostnme = \"typo\""), "", "unknown field"),
    ];
    for (text, field, needle) in cases {
        let e = Personality::parse(&text).unwrap_err();
        assert_eq!(e.field, field, "{text}\n=> {e}");
        assert!(e.to_string().contains(needle), "{text}\n=> {e}");
    }
}

#[test]
fn unknown_fields_inside_links_are_refused() {
    let e = Personality::parse("hostname = \"a\"\n[[interfaces]]\nname = \"eth0\"\nbogus = 1\n");
    assert!(e.is_err(), "{e:?}");
}

#[test]
fn review_cases_link_local_gateways_vlans_and_bond_monitoring() {
    // An IPv6 router is reached by its link-local address.
    let p = Personality::parse(
        "hostname = \"a\"\n[[interfaces]]\nname = \"eth0\"\naddresses = [\"2001:db8::5/64\"]\ngateway = \"fe80::1\"\n",
    )
    .unwrap();
    let net: Value = serde_json::from_str(&p.nocloud().network_config).unwrap();
    assert_eq!(net["ethernets"]["eth0"]["routes"][0]["to"], "::/0");
    // Two VLANs with one id on one link, a VLAN on a bond member, an interface called "..".
    let bond = "hostname = \"a\"\n[[interfaces]]\nname = \"eth0\"\n[[interfaces]]\nname = \"eth1\"\n\
                [[bonds]]\nname = \"bond0\"\nmembers = [\"eth0\", \"eth1\"]\nmode = \"active-backup\"\n";
    let e = Personality::parse(&format!(
        "{bond}[[vlans]]\nname = \"v1\"\nid = 5\nlink = \"bond0\"\n[[vlans]]\nname = \"v2\"\nid = 5\nlink = \"bond0\"\n"
    ))
    .unwrap_err();
    assert_eq!(e.field, "vlans[1].id", "{e}");
    let e = Personality::parse(&format!(
        "{bond}[[vlans]]\nname = \"v1\"\nid = 5\nlink = \"eth0\"\n"
    ))
    .unwrap_err();
    assert_eq!(e.field, "vlans[0].link", "{e}");
    let e = Personality::parse("hostname = \"a\"\n[[interfaces]]\nname = \"..\"\n").unwrap_err();
    assert_eq!(e.field, "interfaces[0].name", "{e}");
    // Bonds are monitored (netplan's default is not to, and then never fails over).
    let p = Personality::parse(bond).unwrap();
    let net: Value = serde_json::from_str(&p.nocloud().network_config).unwrap();
    assert_eq!(
        net["bonds"]["bond0"]["parameters"]["mii-monitor-interval"],
        100
    );
}
