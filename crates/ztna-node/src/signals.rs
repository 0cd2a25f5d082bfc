//! Signal handling shared by the daemons: SIGTERM/SIGINT start a graceful drain (cancel the
//! token), a second one forces exit; SIGHUP asks for a reload.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Spawns the signal watcher. Every SIGHUP puts one `()` on the returned channel.
pub fn install(
    shutdown: CancellationToken,
    name: &'static str,
) -> std::io::Result<mpsc::Receiver<()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM: draining (send again to force exit)");
                    break;
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT: draining (press Ctrl-C again to force exit)");
                    break;
                }
                _ = hup.recv() => {
                    // A reload already queued covers this one too.
                    let _ = tx.try_send(());
                }
            }
        }
        shutdown.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("{name}: second signal, exiting immediately");
        std::process::exit(130);
    });
    Ok(rx)
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

/// Adds a list override for `key` (from a repeatable flag) when the list is not empty.
pub fn push_list_override(
    overrides: &mut Vec<(&'static str, toml::Value)>,
    key: &'static str,
    values: Vec<String>,
) {
    push_override(overrides, key, (!values.is_empty()).then_some(values));
}
