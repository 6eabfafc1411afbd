//! `fedmq config check`.

use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a config file: unknown or misplaced keys (with line and suggestion), bad values.
    /// Prints the effective configuration (defaults and environment applied, secrets masked).
    Check {
        /// The file to check.
        file: PathBuf,
    },
}

pub fn run(cmd: ConfigCommand) -> Result<()> {
    match cmd {
        ConfigCommand::Check { file } => {
            let mut cfg = fedmq::config::Config::load(&file)?;
            cfg.apply_env();
            eprintln!("{}: ok", file.display());
            print!("{}", cfg.to_yaml_masked());
            Ok(())
        }
    }
}
