//! Signal handling shared by the daemons: SIGTERM/SIGINT start a graceful drain (cancel the
//! token), a second one forces exit.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Spawns the signal watcher. Returns an error if the handlers cannot be installed.
pub fn install(shutdown: CancellationToken, name: &'static str) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining (send again to force exit)"),
            _ = int.recv() => tracing::info!("SIGINT: draining (press Ctrl-C again to force exit)"),
        }
        shutdown.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("{name}: second signal, exiting immediately");
        std::process::exit(130);
    });
    Ok(())
}

/// Adds `value` under `key` to a list of config overrides if it was given.
pub fn push_override(
    overrides: &mut Vec<(&'static str, toml::Value)>,
    key: &'static str,
    value: Option<impl Into<toml::Value>>,
) {
    if let Some(v) = value {
        overrides.push((key, v.into()));
    }
}
