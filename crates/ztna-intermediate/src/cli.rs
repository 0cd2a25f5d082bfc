//! Command line of `ztna-intermediate`: parse arguments, load config, run, reload on SIGHUP.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ztna_node::signals::push_override;

/// Public QUIC relay of ZTNA: mTLS, default-deny policy, service registry, TCP/UDP relay.
#[derive(Parser)]
#[command(name = "ztna-intermediate", version)]
struct Cli {
    /// Config file (TOML).
    #[arg(long, short, env = "ZTNA_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration (and certificates), print the problem if any, and exit.
    #[arg(long)]
    check_config: bool,
    /// QUIC listen address (`listen`).
    #[arg(long, env = "ZTNA_LISTEN")]
    listen: Option<String>,
    /// Ops endpoint address (`ops_listen`).
    #[arg(long, env = "ZTNA_OPS_LISTEN")]
    ops_listen: Option<String>,
    /// Drain timeout, e.g. "30s" (`drain_timeout`).
    #[arg(long, env = "ZTNA_DRAIN_TIMEOUT")]
    drain_timeout: Option<String>,
    /// CA certificate (`tls.ca`).
    #[arg(long, env = "ZTNA_TLS_CA")]
    tls_ca: Option<String>,
    /// Certificate chain (`tls.cert`).
    #[arg(long, env = "ZTNA_TLS_CERT")]
    tls_cert: Option<String>,
    /// Private key (`tls.key`).
    #[arg(long, env = "ZTNA_TLS_KEY")]
    tls_key: Option<String>,
}

/// Runs the daemon with these command-line arguments (the first is the program name).
pub fn main_from<I: IntoIterator<Item = OsString>>(args: I) -> ExitCode {
    let cli = Cli::parse_from(args);
    let mut o = Vec::new();
    push_override(&mut o, "listen", cli.listen);
    push_override(&mut o, "ops_listen", cli.ops_listen);
    push_override(&mut o, "drain_timeout", cli.drain_timeout);
    push_override(&mut o, "tls.ca", cli.tls_ca);
    push_override(&mut o, "tls.cert", cli.tls_cert);
    push_override(&mut o, "tls.key", cli.tls_key);
    let config = crate::Config::load(cli.config.as_deref(), o.clone());
    let path = cli.config.clone();
    let load = move || crate::Config::load(path.as_deref(), o.clone()).map_err(|e| e.to_string());
    ztna_node::daemon::main(
        "ztna-intermediate",
        config,
        cli.check_config,
        |c| {
            ztna_node::Identity::load(&c.tls, ztna_proto::Role::Intermediate)
                .map(drop)
                .map_err(|e| e.to_string())
        },
        |config, shutdown, hups| async move {
            let im = crate::Intermediate::bind(config)?;
            let handle = im.handle();
            tokio::spawn(ztna_node::daemon::reload_loop(hups, load, move |c| {
                handle.reload(c)
            }));
            im.run(shutdown).await;
            Ok::<(), crate::StartError>(())
        },
    )
}
