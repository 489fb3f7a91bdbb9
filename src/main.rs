//! The `rack` binary: the server (`rack server`) and the client commands.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    rack::tls::install_provider();
    let cli = rack::cli::Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("the tokio runtime starts at startup");
    runtime.block_on(rack::cli::run(cli))
}
