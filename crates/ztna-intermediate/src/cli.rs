//! Command line of `ztna-intermediate`: parse arguments, load config, run, reload on SIGHUP.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use ztna_node::daemon::{CommonArgs, Tool};
use ztna_node::signals::push_override;

/// Public QUIC relay of ZTNA: mTLS, default-deny policy, service registry, TCP/UDP relay.
#[derive(Parser)]
#[command(name = "ztna-intermediate", version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Without a subcommand the daemon runs.
    #[command(subcommand)]
    tool: Option<Tool>,
    /// QUIC listen address (`listen`).
    #[arg(long, env = "ZTNA_LISTEN")]
    listen: Option<String>,
    /// Drain timeout, e.g. "30s" (`drain_timeout`).
    #[arg(long, env = "ZTNA_DRAIN_TIMEOUT")]
    drain_timeout: Option<String>,
}

/// Runs the daemon with these command-line arguments (the first is the program name).
pub fn main_from<I: IntoIterator<Item = OsString>>(args: I) -> ExitCode {
    let cli = Cli::parse_from(args);
    if let Some(tool) = cli.tool {
        return ztna_node::daemon::tool(tool, Cli::command(), |args| {
            cli.common.status(
                "ztna-intermediate",
                ztna_proto::Role::Intermediate,
                args,
                crate::config::default_ops(),
                crate::status::render,
            )
        });
    }
    let mut o = cli.common.overrides();
    push_override(&mut o, "listen", cli.listen);
    push_override(&mut o, "drain_timeout", cli.drain_timeout);
    let path = cli.common.config.clone();
    ztna_node::daemon::main(
        "ztna-intermediate",
        ztna_proto::Role::Intermediate,
        &cli.common,
        move || crate::Config::load(path.as_deref(), o.clone()),
        |config, shutdown, reloads| async move {
            let daemon = crate::Intermediate::bind(config)?;
            let handle = daemon.handle();
            reloads.spawn(daemon.metrics().common.reloads.clone(), move |c| {
                handle.reload(c)
            });
            daemon.run(shutdown).await;
            Ok::<(), crate::StartError>(())
        },
    )
}
