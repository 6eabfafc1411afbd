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
        /// Override fedmq_args.rank (0 = server, 1.. = clients).
        #[arg(long)]
        rank: Option<usize>,
        /// Override common_args.run_id.
        #[arg(long)]
        run_id: Option<String>,
    },
}

pub fn run(cmd: ConfigCommand) -> Result<()> {
    match cmd {
        ConfigCommand::Check { file, rank, run_id } => {
            let cfg = super::load_config_args(&super::ConfigArg {
                config: file.clone(),
                rank,
                run_id,
            })?;
            eprintln!("{}: ok", file.display());
            print!("{}", cfg.to_yaml_masked());
            Ok(())
        }
    }
}
