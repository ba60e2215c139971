//! `gavel-loadtest`: see the library's documentation.

use clap::Parser;

fn main() -> std::process::ExitCode {
    match gavel_loadtest::main(gavel_loadtest::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gavel-loadtest: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
