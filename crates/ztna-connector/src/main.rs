//! ztna-connector (see the library for everything it does).

fn main() -> std::process::ExitCode {
    ztna_connector::cli::main_from(std::env::args_os())
}
