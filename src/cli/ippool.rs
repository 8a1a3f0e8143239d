//! `streamer ippool ...`: IP pools, the subnets personalities take addresses from (`pool:NAME`).

use std::net::IpAddr;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::manage::{Conn, run, table};
use crate::mgmt::protocol::{IpPoolInfo, Request};
use crate::personality::Dns;
use crate::personality::ippool::IpPool;

#[derive(Debug, Args)]
pub struct IpPoolCmd {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: IpPoolSub,
}

#[derive(Debug, Subcommand)]
enum IpPoolSub {
    /// Create a pool: its subnet, the range it hands out, and what its links get.
    Create {
        name: String,
        /// The subnet, as ADDR/PREFIX (10.0.0.0/24).
        #[arg(long)]
        subnet: String,
        /// First and last address handed out.
        #[arg(long)]
        first: IpAddr,
        #[arg(long)]
        last: IpAddr,
        /// The default route of the links that take an address from it.
        #[arg(long)]
        gateway: Option<IpAddr>,
        /// Name servers (comma separated).
        #[arg(long, value_delimiter = ',')]
        dns: Vec<IpAddr>,
        /// Search domains (comma separated).
        #[arg(long, value_delimiter = ',')]
        search: Vec<String>,
    },
    /// The pools, how many addresses each holds, and which volume holds which.
    List,
    /// Delete a pool (refused while a volume holds one of its addresses).
    Delete { name: String },
}

pub fn ippool(c: IpPoolCmd) -> ExitCode {
    let req = match c.cmd {
        IpPoolSub::Create {
            name,
            subnet,
            first,
            last,
            gateway,
            dns,
            search,
        } => Request::IpPoolCreate {
            pool: Box::new(IpPool {
                name,
                subnet,
                first,
                last,
                gateway,
                dns: Dns {
                    servers: dns,
                    search,
                },
            }),
        },
        IpPoolSub::List => Request::IpPoolList,
        IpPoolSub::Delete { name } => Request::IpPoolDelete { name },
    };
    run(&c.conn, req, None)
}

pub(super) fn render(list: &[IpPoolInfo]) -> String {
    let mut out = table(
        &["NAME", "SUBNET", "RANGE", "GATEWAY", "HELD"],
        list.iter()
            .map(|p| {
                vec![
                    p.pool.name.clone(),
                    p.pool.subnet.clone(),
                    format!("{} - {}", p.pool.first, p.pool.last),
                    p.pool.gateway.map_or("-".into(), |g| g.to_string()),
                    format!("{} of {}", p.held.len(), p.size),
                ]
            })
            .collect(),
    );
    for p in list {
        for h in &p.held {
            out.push_str(&format!(
                "  {}: {} held by volume {}\n",
                p.pool.name, h.address, h.volume
            ));
        }
    }
    out
}
