//! The part of `main` every daemon shares: config errors and `--check-config`, the runtime,
//! signal handling and exit codes (0 after a graceful stop, 1 when it cannot start, 2 for a bad
//! configuration).

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;

/// Runs a daemon binary.
///
/// `check` validates what the config points to (certificates); with `check_config` the process
/// stops after it. Otherwise `run` is driven on a multi-threaded runtime until it returns, with
/// SIGTERM/SIGINT cancelling its token (a second signal exits at once) and every SIGHUP arriving
/// on its channel.
pub fn main<C, E, Fut>(
    name: &'static str,
    config: Result<C, ConfigError>,
    check_config: bool,
    check: impl FnOnce(&C) -> Result<(), String>,
    run: impl FnOnce(C, CancellationToken, mpsc::Receiver<()>) -> Fut,
) -> ExitCode
where
    E: Display,
    Fut: Future<Output = Result<(), E>>,
{
    crate::logging::init();
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    if check_config {
        return match check(&config) {
            Ok(()) => {
                println!("{name}: config ok");
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
        match run(config, shutdown, hups).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{name}: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Applies reloads until the channel closes: each SIGHUP re-reads the configuration with `load`
/// and hands it to `apply`. A failure keeps the running configuration and logs why.
pub async fn reload_loop<C>(
    mut hups: mpsc::Receiver<()>,
    load: impl Fn() -> Result<C, String>,
    apply: impl Fn(C) -> Result<String, String>,
) {
    while hups.recv().await.is_some() {
        match load().and_then(&apply) {
            Ok(summary) => tracing::info!(%summary, "SIGHUP: configuration reloaded"),
            Err(why) => {
                tracing::error!(%why, "SIGHUP: reload failed, keeping the running configuration")
            }
        }
    }
}
