//! The `fedmq` command: thin entry point; the subcommands live in `cli/`.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_tracing(args.verbose, args.quiet_logs());
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line: "what failed: why: root cause".
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
