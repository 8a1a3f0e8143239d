//! `streamer pair ...`: the mirrored pair this node belongs to.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};

use super::manage::{Conn, fields, run, table};
use crate::mgmt::protocol::{PairInfo, Request};

#[derive(Debug, Args)]
pub struct PairCmd {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: PairSub,
}

#[derive(Debug, Subcommand)]
enum PairSub {
    /// The pair's nodes (up or down), the peer link, and etcd, as this node sees them.
    Status,
}

pub fn pair(c: PairCmd) -> ExitCode {
    match c.cmd {
        PairSub::Status => run(&c.conn, Request::PairStatus, None),
    }
}

/// "12s ago" style age of a time given in seconds since the epoch.
fn ago(unix: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{}s ago", now.saturating_sub(unix))
}

pub(super) fn render(p: &PairInfo) -> String {
    let etcd = match (&p.etcd_error, p.etcd_failing_since_unix) {
        (Some(why), Some(since)) => format!(
            "{} UNREACHABLE since {}: {why}",
            p.etcd.join(","),
            ago(since)
        ),
        _ => format!("{} reachable", p.etcd.join(",")),
    };
    let link = if p.link.up {
        format!(
            "up to {} since {}",
            p.link.peer.as_deref().unwrap_or("?"),
            ago(p.link.since_unix)
        )
    } else {
        format!(
            "DOWN since {}: {}",
            ago(p.link.since_unix),
            p.link.reason.as_deref().unwrap_or("?")
        )
    };
    let mut out = fields(&[
        ("pair", p.pair.clone()),
        ("this node", p.node.clone()),
        ("etcd", etcd),
        ("peer link", link),
    ]);
    out.push_str(&table(
        &["NODE", "STATE", "PEER ADDRESS", "PID", "SINCE"],
        p.nodes
            .iter()
            .map(|n| {
                let name = if n.this_node {
                    format!("{} (this node)", n.name)
                } else {
                    n.name.clone()
                };
                vec![
                    name,
                    if n.up { "up" } else { "DOWN" }.into(),
                    n.peer_addr.clone(),
                    n.pid.map_or("-".into(), |p| p.to_string()),
                    n.since_unix.map_or("-".into(), ago),
                ]
            })
            .collect(),
    ));
    if !p.volumes.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &["VOLUME", "ROLE", "STATE", "SINCE", "OUT OF SYNC", "RESYNC"],
            p.volumes
                .iter()
                .map(|v| {
                    let state = match &v.reason {
                        Some(why) => format!("{}: {why}", v.state),
                        None => v.state.clone(),
                    };
                    let resync = match (v.resync_percent, v.resync_eta_secs) {
                        (Some(p), Some(eta)) => format!("{p}%, ETA {eta}s"),
                        (Some(p), None) => format!("{p}%"),
                        _ => "-".into(),
                    };
                    vec![
                        v.name.clone(),
                        v.role.clone(),
                        state,
                        v.since_unix.map_or("-".into(), ago),
                        if v.role == "owner" {
                            indicatif::HumanBytes(v.out_of_sync_bytes).to_string()
                        } else {
                            "-".into()
                        },
                        resync,
                    ]
                })
                .collect(),
        ));
    }
    out
}
