//! Logging setup shared by the binaries: `RUST_LOG`-style filter (default `info`), written to
//! stderr as text or JSON lines.
//!
//! Colour codes are written only when stderr is a terminal (and `NO_COLOR` is unset), so systemd's
//! journal and log files get plain text. `json` writes one object per line with the event's
//! fields and its spans (peer identity, service), for shippers like Loki or Elasticsearch.

use std::io::IsTerminal;

use serde::Deserialize;
use tracing_subscriber::EnvFilter;

/// `log_format` in the config files, `--log-format`, `ZTNA_LOG_FORMAT`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Whether to write colour codes: only to a terminal, and not when `NO_COLOR` is set.
pub fn use_colour() -> bool {
    let no_color = std::env::var_os("NO_COLOR").filter(|v| !v.is_empty());
    std::io::stderr().is_terminal() && no_color.is_none()
}

/// Installs the global tracing subscriber writing text. Safe to call more than once (later
/// calls are no-ops).
pub fn init() {
    init_with(LogFormat::Text);
}

/// Installs the global tracing subscriber in `format`. Later calls are no-ops.
pub fn init_with(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_target(false)
            .with_ansi(use_colour())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_ansi(false)
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    };
}
