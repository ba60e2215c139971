use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    match gavel::run(gavel::config::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gavel: {e:#}");
            ExitCode::FAILURE
        }
    }
}
