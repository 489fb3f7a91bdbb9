//! The `rack` binary: the server (`rack server`) and the client commands.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    rack::tls::install_provider();
    let cli = rack::cli::Cli::parse();
    // A keeper runs beside every app process: one thread is all it needs.
    let runtime = if cli.is_keeper() {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Runtime::new()
    }
    .expect("the tokio runtime starts at startup");
    runtime.block_on(rack::cli::run(cli))
}
