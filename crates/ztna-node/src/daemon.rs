//! The part of `main` every daemon shares: config errors and `--check-config`, the runtime,
//! signal handling and exit codes (0 after a graceful stop, 1 when it cannot start, 2 for a bad
//! configuration).

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;

/// Runs a daemon binary.
///
/// `check` validates what the config points to (certificates); with `check_config` the process
/// stops after it. Otherwise `run` is driven on a multi-threaded runtime until it returns, with
/// SIGTERM/SIGINT cancelling its token (a second signal exits at once).
pub fn main<C, E, Fut>(
    name: &'static str,
    config: Result<C, ConfigError>,
    check_config: bool,
    check: impl FnOnce(&C) -> Result<(), String>,
    run: impl FnOnce(C, CancellationToken) -> Fut,
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
        if let Err(e) = crate::signals::install(shutdown.clone(), name) {
            eprintln!("{name}: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
        match run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("{name}: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
