//! The management plane: a typed protocol on a Unix socket (`protocol`), the server side that
//! checks who is asking and runs commands on the node (`server`), and the client side the
//! `streamer` subcommands use (`client`).

pub mod client;
pub mod protocol;
pub mod server;
