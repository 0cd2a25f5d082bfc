//! Command line of `ztna-agent`: parse arguments, load config, run, reload on SIGHUP.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use ztna_node::daemon::{CommonArgs, Tool};
use ztna_node::signals::{push_list_override, push_override};

/// Exposes ZTNA services on local ports, tunnelled through an intermediate.
#[derive(Parser)]
#[command(name = "ztna-agent", version)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    /// Without a subcommand the daemon runs.
    #[command(subcommand)]
    tool: Option<Tool>,
    /// Intermediate host:port in order of preference; repeat for each (`intermediates`).
    #[arg(
        long = "intermediate",
        env = "ZTNA_INTERMEDIATES",
        value_delimiter = ','
    )]
    intermediates: Vec<String>,
    /// Local UDP address of the QUIC endpoint, e.g. "0.0.0.0:0" for IPv4 only (`bind`).
    #[arg(long, env = "ZTNA_BIND")]
    bind: Option<String>,
    /// Extra forward, e.g. `tcp:127.0.0.1:8080=web` (repeatable; adds to `[[forward]]`).
    #[arg(long = "forward", env = "ZTNA_FORWARDS", value_delimiter = ',')]
    forwards: Vec<String>,
}

/// Runs the daemon with these command-line arguments (the first is the program name).
pub fn main_from<I: IntoIterator<Item = OsString>>(args: I) -> ExitCode {
    let cli = Cli::parse_from(args);
    if let Some(tool) = cli.tool {
        return ztna_node::daemon::tool(tool, Cli::command(), |args| {
            cli.common.status(
                "ztna-agent",
                ztna_proto::Role::Agent,
                args,
                crate::config::default_ops(),
                crate::status::render,
            )
        });
    }
    let mut o = cli.common.overrides();
    push_list_override(&mut o, "intermediates", cli.intermediates);
    push_override(&mut o, "bind", cli.bind);
    let mut extra = Vec::new();
    for f in &cli.forwards {
        match crate::Forward::parse(f) {
            Ok(f) => extra.push(f),
            Err(e) => {
                eprintln!("ztna-agent: --forward: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let path = cli.common.config.clone();
    ztna_node::daemon::main(
        "ztna-agent",
        ztna_proto::Role::Agent,
        &cli.common,
        move || crate::Config::load(path.as_deref(), o.clone(), extra.clone()),
        |config, shutdown, reloads| async move {
            let daemon = crate::Agent::bind(config).await?;
            let handle = daemon.handle();
            reloads.spawn(daemon.metrics().common.reloads.clone(), move |c| {
                handle.reload(c)
            });
            daemon.run(shutdown).await;
            Ok::<(), crate::StartError>(())
        },
    )
}
