//! ztna-intermediate: the public QUIC relay (see the library for everything it does).

fn main() -> std::process::ExitCode {
    ztna_intermediate::cli::main_from(std::env::args_os())
}
