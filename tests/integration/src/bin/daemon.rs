//! `ztna-daemon ROLE [ARGS...]`: the three daemons' real command lines in one test binary, so the
//! process-level tests (signals, exit codes, sd_notify) run exactly the code the shipped
//! binaries run, without depending on other packages' build artifacts.

use std::ffi::OsString;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let role = args
        .next()
        .and_then(|r| r.into_string().ok())
        .unwrap_or_default();
    let argv = std::iter::once(OsString::from(format!("ztna-{role}"))).chain(args);
    match role.as_str() {
        "intermediate" => ztna_intermediate::cli::main_from(argv),
        "connector" => ztna_connector::cli::main_from(argv),
        "agent" => ztna_agent::cli::main_from(argv),
        _ => {
            eprintln!("usage: ztna-daemon intermediate|connector|agent [ARGS...]");
            ExitCode::from(2)
        }
    }
}
