//! The part of `main` every daemon shares: the common arguments, config errors and
//! `--check-config`, the runtime, signal handling, SIGHUP reloads and exit codes (0 after a
//! graceful stop, 1 when it cannot start, 2 for a bad configuration).

use std::fmt::Display;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use ztna_proto::Role;

use crate::config::{ConfigError, TlsConfig};
use crate::logging::LogFormat;
use crate::signals::push_override;
use crate::status::StatusArgs;

/// Arguments every daemon takes (each also a config key of the daemon's TOML file).
#[derive(clap::Args, Debug)]
pub struct CommonArgs {
    /// Config file (TOML).
    #[arg(long, short, env = "ZTNA_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Validate the configuration (and certificates), print the problem if any, and exit.
    #[arg(long)]
    pub check_config: bool,
    /// With --check-config: check the file only, without reading the certificates (for
    /// build-time checks, when the keys are systemd credentials that only exist at run time).
    #[arg(long, requires = "check_config")]
    pub config_only: bool,
    /// Ops endpoint address (`ops_listen`).
    #[arg(long, env = "ZTNA_OPS_LISTEN")]
    pub ops_listen: Option<String>,
    /// CA certificate (`tls.ca`).
    #[arg(long, env = "ZTNA_TLS_CA")]
    pub tls_ca: Option<String>,
    /// Certificate chain (`tls.cert`).
    #[arg(long, env = "ZTNA_TLS_CERT")]
    pub tls_cert: Option<String>,
    /// Private key (`tls.key`).
    #[arg(long, env = "ZTNA_TLS_KEY")]
    pub tls_key: Option<String>,
    /// Log format: text, or json (one object per line) for log shippers (`log_format`).
    #[arg(long, env = "ZTNA_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

impl CommonArgs {
    /// The config overrides these arguments stand for.
    pub fn overrides(&self) -> Vec<(&'static str, toml::Value)> {
        let mut o = Vec::new();
        push_override(&mut o, "ops_listen", self.ops_listen.clone());
        push_override(&mut o, "tls.ca", self.tls_ca.clone());
        push_override(&mut o, "tls.cert", self.tls_cert.clone());
        push_override(&mut o, "tls.key", self.tls_key.clone());
        push_override(&mut o, "log_format", self.log_format.map(LogFormat::as_str));
        o
    }

    /// The `status` subcommand of daemon `name`: asks its ops endpoint (found from `args`,
    /// `--ops-listen`, the config file, else `default_ops`) and prints `render`'s summary.
    pub fn status(
        &self,
        name: &str,
        role: Role,
        args: &StatusArgs,
        default_ops: std::net::SocketAddr,
        render: impl Fn(&serde_json::Value) -> Result<String, String>,
    ) -> ExitCode {
        let addr = crate::status::ops_addr(
            args,
            self.ops_listen.as_deref(),
            self.config.as_deref(),
            default_ops,
        );
        crate::status::run(name, role, args, addr, render)
    }
}

/// What [`main`] needs to know of a daemon's configuration.
pub trait DaemonConfig: Send + 'static {
    /// The `[tls]` section, which `--check-config` verifies.
    fn tls(&self) -> &TlsConfig;
    /// `log_format`.
    fn log_format(&self) -> LogFormat;
}

/// Subcommands every daemon has besides running (which is what it does without one).
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Tool {
    /// Print a shell completion script to stdout (e.g. `ztna-agent completions bash >
    /// /etc/bash_completion.d/ztna-agent`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout (e.g. `ztna-agent man | man -l -`).
    Man,
    /// Ask the running daemon how it is doing (its ops endpoint's /status) and print a summary:
    /// identity, readiness, certificate, relays, services, flows. Exit 0 when it is ready, 1
    /// when it answered but is not ready, 2 when it cannot be reached.
    Status(StatusArgs),
}

/// Runs a [`Tool`] for the program whose clap definition is `command`; `status` runs the
/// `status` subcommand.
pub fn tool(
    tool: Tool,
    mut command: clap::Command,
    status: impl FnOnce(&StatusArgs) -> ExitCode,
) -> ExitCode {
    let name = command.get_name().to_string();
    let tool = match tool {
        Tool::Status(args) => return status(&args),
        other => other,
    };
    let mut out = std::io::stdout().lock();
    let written = match tool {
        Tool::Completions { shell } => {
            clap_complete::generate(shell, &mut command, name.clone(), &mut out);
            Ok(())
        }
        Tool::Man => clap_mangen::Man::new(command).render(&mut out),
        Tool::Status(_) => Ok(()), // answered above
    };
    match written.and_then(|()| std::io::Write::flush(&mut out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: cannot write to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Hands SIGHUPs to a daemon: each one re-reads the configuration and applies it.
pub struct Reloads<C> {
    hups: mpsc::Receiver<()>,
    load: Box<dyn Fn() -> Result<C, ConfigError> + Send>,
}

impl<C: Send + 'static> Reloads<C> {
    /// Applies reloads in the background until the process ends. A failure (unreadable file, bad
    /// config, bad certificate) keeps the running configuration and logs why; `gauges` record
    /// each outcome.
    pub fn spawn(
        self,
        gauges: crate::metrics::ReloadGauges,
        apply: impl Fn(C) -> Result<String, String> + Send + 'static,
    ) {
        let Reloads { mut hups, load } = self;
        tokio::spawn(async move {
            while hups.recv().await.is_some() {
                match load().map_err(|e| e.to_string()).and_then(&apply) {
                    Ok(summary) => {
                        gauges.record(true);
                        tracing::info!(%summary, "SIGHUP: configuration reloaded")
                    }
                    Err(why) => {
                        gauges.record(false);
                        tracing::error!(%why, "SIGHUP: reload failed, keeping the running configuration")
                    }
                }
            }
        });
    }
}

/// Warns about each named config field that differs between `$new` and `$old`: a reload does not
/// apply it. Field names are the config file's keys.
#[macro_export]
macro_rules! warn_unapplied {
    ($new:expr, $old:expr; $($field:ident),+ $(,)?) => {
        $crate::daemon::warn_unapplied(&[$((stringify!($field), $new.$field != $old.$field)),+])
    };
}

/// Logs the keys a reload changed but cannot apply.
pub fn warn_unapplied(changes: &[(&str, bool)]) {
    for (key, changed) in changes {
        if *changed {
            tracing::warn!(
                key,
                "changed in the config file; a reload does not apply it, restart to do so"
            );
        }
    }
}

/// Runs a daemon binary.
///
/// `load` reads the configuration (and again on every SIGHUP). `--check-config` verifies it and
/// its certificates against `role` and exits. Otherwise `run` is driven on a multi-threaded
/// runtime until it returns, with SIGTERM/SIGINT cancelling its token (a second signal exits at
/// once).
pub fn main<C, E, Fut>(
    name: &'static str,
    role: Role,
    common: &CommonArgs,
    load: impl Fn() -> Result<C, ConfigError> + Send + 'static,
    run: impl FnOnce(C, CancellationToken, Reloads<C>) -> Fut,
) -> ExitCode
where
    C: DaemonConfig,
    E: Display,
    Fut: Future<Output = Result<(), E>>,
{
    let config = match load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    crate::logging::init_with(config.log_format());
    if common.check_config && common.config_only {
        println!("{name}: config ok (certificates not checked)");
        return ExitCode::SUCCESS;
    }
    if common.check_config {
        return match crate::Identity::check(config.tls(), role) {
            Ok(summary) => {
                println!("{name}: config ok ({summary})");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{name}: {e}");
                ExitCode::from(2)
            }
        };
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let hups = match crate::signals::install(shutdown.clone(), name) {
            Ok(h) => h,
            Err(e) => {
                eprintln!("{name}: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let reloads = Reloads {
            hups,
            load: Box::new(load),
        };
        match run(config, shutdown, reloads).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{name}: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
