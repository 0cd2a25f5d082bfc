//! Command line of `ztna-connector`: parse arguments, load config, run, reload on SIGHUP.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use ztna_node::daemon::{CommonArgs, Tool};
use ztna_node::signals::{push_list_override, push_override};

/// Runs next to private backends; dials out to every intermediate and forwards flows.
#[derive(Parser)]
#[command(name = "ztna-connector", version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Without a subcommand the daemon runs.
    #[command(subcommand)]
    tool: Option<Tool>,
    /// Intermediate host:port; repeat for each (`intermediates`).
    #[arg(
        long = "intermediate",
        env = "ZTNA_INTERMEDIATES",
        value_delimiter = ','
    )]
    intermediates: Vec<String>,
    /// Local UDP address of the QUIC endpoint, e.g. "0.0.0.0:0" for IPv4 only (`bind`).
    #[arg(long, env = "ZTNA_BIND")]
    bind: Option<String>,
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
                "ztna-connector",
                ztna_proto::Role::Connector,
                args,
                crate::config::default_ops(),
                crate::status::render,
            )
        });
    }
    let mut o = cli.common.overrides();
    push_list_override(&mut o, "intermediates", cli.intermediates);
    push_override(&mut o, "bind", cli.bind);
    push_override(&mut o, "drain_timeout", cli.drain_timeout);
    let path = cli.common.config.clone();
    ztna_node::daemon::main(
        "ztna-connector",
        ztna_proto::Role::Connector,
        &cli.common,
        move || crate::Config::load(path.as_deref(), o.clone()),
        |config, shutdown, reloads| async move {
            let daemon = crate::Connector::bind(config)?;
            let handle = daemon.handle();
            reloads.spawn(daemon.metrics().common.reloads.clone(), move |c| {
                handle.reload(c)
            });
            daemon.run(shutdown).await;
            Ok::<(), crate::StartError>(())
        },
    )
}
