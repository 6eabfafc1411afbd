//! `fedmq config check`.

use anyhow::Result;
use clap::Subcommand;
use fedmq::config::LoadMode;
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a config file: unknown or misplaced keys (with line and suggestion), bad values, and
    /// the broker and store files it names. Prints the effective configuration (defaults and
    /// environment applied, `~` expanded, secrets masked).
    Check {
        /// The file to check.
        file: PathBuf,
        /// Check it as `fedmq run`, `data`, `train` and `bench` load it: FedML's broker and store
        /// files (comm_args.mqtt_config_path, s3_config_path) are not read, one warning each.
        /// Without it, as `fedmq server` and `fedmq client` load it: they must exist.
        #[arg(long)]
        local: bool,
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
        ConfigCommand::Check {
            file,
            local,
            rank,
            run_id,
        } => {
            let mode = if local {
                LoadMode::Local
            } else {
                LoadMode::Distributed
            };
            let cfg = super::load_config_args(
                &super::ConfigArg {
                    config: file.clone(),
                    rank: rank.map(super::Numbered::Given),
                    run_id,
                },
                mode,
            )?;
            eprintln!(
                "{}: ok{}",
                file.display(),
                if local { " (for a local run)" } else { "" }
            );
            print!("{}", cfg.to_yaml_masked());
            Ok(())
        }
    }
}
