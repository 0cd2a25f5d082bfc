//! ztna-agent (see the library for everything it does).

fn main() -> std::process::ExitCode {
    ztna_agent::cli::main_from(std::env::args_os())
}
