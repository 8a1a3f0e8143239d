//! `streamer deploy PLAN`: many servers' volumes and personalities from one plan file
//! (`personality::plan` reads it, `node/deploy.rs` checks and applies it; `docs/deploy.md`).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::manage::{Conn, fail, fail_kind, request_with_bar, table};
use crate::mgmt::protocol::{Request, Response};
use crate::node::{DeployAction, DeployReport};

/// Largest plan file read (it must fit a management request; templates keep plans short).
const MAX_PLAN_BYTES: u64 = 4 << 20;

#[derive(Debug, Args)]
pub struct DeployCmd {
    #[command(flatten)]
    conn: Conn,
    /// The plan: TOML (or JSON), with `image`, `defaults` and `[[servers]]` (docs/deploy.md).
    plan: PathBuf,
    /// Make the good servers even if some are bad (default: none unless all are good).
    #[arg(long)]
    skip_bad: bool,
    /// Check the plan against the node and say what would be done; make nothing.
    #[arg(long)]
    dry_run: bool,
}

pub fn deploy(c: DeployCmd) -> ExitCode {
    let text = match read_plan(&c.plan) {
        Ok(t) => t,
        Err(e) => return fail(&c.conn, format!("{}: {e}", c.plan.display())),
    };
    let req = Request::Deploy {
        plan: text,
        skip_bad: c.skip_bad,
        dry_run: c.dry_run,
    };
    let report =
        match request_with_bar(&c.conn, req, None, "{bar:40} {pos}/{len} servers eta {eta}") {
            Ok(Response::Deploy(r)) => r,
            Ok(other) => return fail_kind(&c.conn, "io", format!("unexpected answer {other:?}")),
            Err(e) => return fail_kind(&c.conn, e.kind(), e),
        };
    if c.conn.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", render(&report, &c.plan.display().to_string()));
    }
    let bad = report
        .servers
        .iter()
        .any(|o| matches!(o.action, DeployAction::Refused | DeployAction::Failed));
    if bad {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn read_plan(path: &std::path::Path) -> Result<String, String> {
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    f.take(MAX_PLAN_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_PLAN_BYTES {
        return Err(format!("larger than {MAX_PLAN_BYTES} bytes"));
    }
    Ok(text)
}

/// A summary line, a table of the servers, and each problem on a line of its own.
pub(super) fn render(r: &DeployReport, plan: &str) -> String {
    let count = |a: DeployAction| r.servers.iter().filter(|o| o.action == a).count();
    let (create, update, same) = (
        count(DeployAction::Create),
        count(DeployAction::Update),
        count(DeployAction::Unchanged),
    );
    let (refused, failed) = (count(DeployAction::Refused), count(DeployAction::Failed));
    let verb = |done: &str, todo: &str| if r.applied { done } else { todo }.to_string();
    let mut parts = vec![
        format!("{create} {}", verb("created", "to create")),
        format!("{update} {}", verb("updated", "to update")),
        format!("{same} unchanged"),
    ];
    if refused > 0 {
        parts.push(format!("{refused} refused"));
    }
    if failed > 0 {
        parts.push(format!("{failed} failed"));
    }
    let outcome = if r.applied {
        ""
    } else if refused > 0 {
        ": nothing was made (fix the refused servers, or give --skip-bad)"
    } else {
        ": a dry run, nothing was made"
    };
    let plan = if plan.is_empty() {
        String::new()
    } else {
        format!(" {plan}")
    };
    let mut out = format!("deploy{plan}: {}{outcome}\n", parts.join(", "));
    let action = |a: DeployAction| match (a, r.applied) {
        (DeployAction::Create, true) => "created",
        (DeployAction::Create, false) => "would create",
        (DeployAction::Update, true) => "updated",
        (DeployAction::Update, false) => "would update",
        (DeployAction::Unchanged, _) => "unchanged",
        (DeployAction::Refused, _) => "refused",
        (DeployAction::Failed, _) => "failed",
    };
    out.push_str(&table(
        &["ENTRY", "VOLUME", "ACTION", "ADDRESSES"],
        r.servers
            .iter()
            .map(|o| {
                let addrs: Vec<String> = o.addresses.iter().map(ToString::to_string).collect();
                vec![
                    o.entry.clone(),
                    if o.name.is_empty() {
                        "-".into()
                    } else {
                        o.name.clone()
                    },
                    action(o.action).into(),
                    if addrs.is_empty() {
                        "-".into()
                    } else {
                        addrs.join(",")
                    },
                ]
            })
            .collect(),
    ));
    for o in &r.servers {
        if let Some(e) = &o.error {
            out.push_str(&format!("{} {}: {e}\n", o.entry, action(o.action)));
        }
    }
    out
}
