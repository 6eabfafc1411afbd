//! `fedmq keys`: Ed25519 signing keys for participants (`<id>.key`, mode 0600) and their public
//! keys (`<id>.pub`), the directory of which is a keyring (`fedmq_args.trusted_keys`).

use anyhow::{bail, Context, Result};
use fedmq::identity::Identity;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    /// Directory to write the keys into (created when missing).
    #[arg(long)]
    out: PathBuf,
    /// Participant ids, comma-separated, e.g. server,client-1,client-2.
    #[arg(long, value_delimiter = ',', required_unless_present = "clients")]
    participants: Vec<String>,
    /// A whole federation: `server` and `client-1` … `client-N` (with --participants: added to
    /// them).
    #[arg(long)]
    clients: Option<usize>,
    /// Replace existing key files.
    #[arg(long)]
    force: bool,
}

pub fn run(mut a: KeysArgs) -> Result<()> {
    if let Some(n) = a.clients {
        let all = std::iter::once(fedmq::server::SERVER_ID.to_string())
            .chain((1..=n).map(fedmq::client::client_id));
        for id in all {
            if !a.participants.contains(&id) {
                a.participants.push(id);
            }
        }
    }
    for id in &a.participants {
        if !fedmq::proto::valid_id(id) {
            bail!(
                "{id:?} is not a valid participant id (1-64 characters: letters, digits, '-', '_')"
            );
        }
        let key = a.out.join(format!("{id}.key"));
        if key.exists() && !a.force {
            bail!("{} exists; pass --force to replace it", key.display());
        }
    }
    for id in &a.participants {
        let (secret, public) = Identity::generate(id)
            .save(&a.out)
            .with_context(|| format!("writing the keys of {id}"))?;
        println!("{}\n{}", secret.display(), public.display());
    }
    eprintln!(
        "fedmq keys: {} key pair(s) in {}. Give each participant its <id>.key \
         (fedmq_args.signing_key; \"{{id}}\" in it stands for the participant id) and the \
         directory of .pub files (fedmq_args.trusted_keys); delete a .pub file to revoke that \
         participant.",
        a.participants.len(),
        a.out.display()
    );
    Ok(())
}
