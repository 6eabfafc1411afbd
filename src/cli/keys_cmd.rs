//! `fedmq keys`: Ed25519 signing keys for participants (`<id>.key`, mode 0600) and their public
//! keys (`<id>.pub`), the directory of which is a keyring (`fedmq_args.trusted_keys`). With a
//! config, also each participant's own store credential (`<id>.s3`, mode 0600) and the IAM
//! policy that confines it on MinIO or AWS (`<id>.s3-policy.json`).

use anyhow::{bail, Context, Result};
use fedmq::config::LoadMode;
use fedmq::crypto::identity::Identity;
use fedmq::store::access::{iam_policy, StoreCredential};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    /// Directory to write the keys into (created when missing).
    #[arg(long)]
    out: PathBuf,
    /// Participant ids, comma-separated, e.g. server,client-1,client-2.
    #[arg(long, value_delimiter = ',', required_unless_present_any = ["clients", "hierarchy"])]
    participants: Vec<String>,
    /// A whole federation: `server` and `client-1` … `client-N` (with --participants: added to
    /// them).
    #[arg(long)]
    clients: Option<usize>,
    /// Replace existing key files.
    #[arg(long)]
    force: bool,
    /// A config whose store secret (CN_S3_SAK, env FEDMQ_S3_SAK) derives each participant's own
    /// store credential: also write `<id>.s3` (for fedmq_args.store_credentials) and
    /// `<id>.s3-policy.json` (the same rights as an IAM policy for MinIO or AWS).
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// With a HierarchicalFL config (-c): the keys of the whole hierarchy. In --out, `server` and
    /// every edge `<run>-edge-<k>` (the cloud's keyring); in `<out>/<run>-edge-<k>/`, the keys
    /// of that edge's site: its `server` (the edge's key as its devices' server) and its devices
    /// (where each device's config finds them: the site's key directory).
    #[arg(long, requires = "config", conflicts_with_all = ["participants", "clients"])]
    hierarchy: bool,
}

pub fn run(mut a: KeysArgs) -> Result<()> {
    if a.hierarchy {
        return hierarchy(&a);
    }
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
    let store = a.config.as_deref().map(store_of).transpose()?;
    write_set(&a.out, &a.participants, store.as_ref(), true)?;
    eprintln!(
        "fedmq keys: {} key pair(s) in {}. Give each participant its <id>.key \
         (fedmq_args.signing_key; \"{{id}}\" in it stands for the participant id) and the \
         directory of .pub files (fedmq_args.trusted_keys); delete a .pub file to revoke that \
         participant.",
        a.participants.len(),
        a.out.display()
    );
    if store.is_some() {
        eprintln!(
            "fedmq keys: store credentials in <id>.s3: give each participant its own and set \
             fedmq_args.store_credentials: \"keys/{{id}}.s3\"; `fedmq store` derives them from its \
             secret, MinIO needs a user and <id>.s3-policy.json per participant (docs/SECURITY.md)."
        );
    }
    Ok(())
}

/// Writes the key pair of each of `participants` into `out` and, with `store` (secret, bucket,
/// run prefix), its store credential and IAM policy (not for `server` unless `server_store`).
fn write_set(
    out: &std::path::Path,
    participants: &[String],
    store: Option<&(String, String, String)>,
    server_store: bool,
) -> Result<()> {
    for id in participants {
        let (secret, public) = Identity::generate(id)
            .save(out)
            .with_context(|| format!("writing the keys of {id}"))?;
        println!("{}\n{}", secret.display(), public.display());
        let Some((store_secret, bucket, run_prefix)) = store else {
            continue;
        };
        if id == fedmq::server::SERVER_ID && !server_store {
            continue;
        }
        let cred = out.join(format!("{id}.s3"));
        StoreCredential::for_participant(store_secret, id)
            .save(&cred)
            .with_context(|| format!("writing {}", cred.display()))?;
        let policy = out.join(format!("{id}.s3-policy.json"));
        let text = serde_json::to_string_pretty(&iam_policy(bucket, run_prefix, id))?;
        std::fs::write(&policy, text + "\n")
            .with_context(|| format!("writing {}", policy.display()))?;
        println!("{}\n{}", cred.display(), policy.display());
    }
    Ok(())
}

/// `fedmq keys --hierarchy -c <config>`: the cloud's keys and each site's.
fn hierarchy(a: &KeysArgs) -> Result<()> {
    let Some(path) = a.config.as_deref() else {
        bail!("--hierarchy needs the federation's config (-c)");
    };
    let cfg = super::load_config(path, LoadMode::Distributed)?;
    if !cfg.hierarchical() {
        bail!(
            "{}: --hierarchy needs train_args.federated_optimizer: HierarchicalFL (got {:?})",
            path.display(),
            cfg.train_args.federated_optimizer
        );
    }
    let run = cfg.common_args.run_id.clone();
    let store = (!cfg
        .comm_args
        .customized_training_s3_config
        .cn_s3_sak
        .is_empty())
    .then(|| store_of(path))
    .transpose()?;
    let sites = fedmq::edge::sites(&cfg);
    let mut cloud = vec![fedmq::server::SERVER_ID.to_string()];
    cloud.extend((1..=sites.len()).map(|k| fedmq::edge::edge_id(&run, k)));
    let mut dirs = vec![(a.out.clone(), cloud.clone())];
    for (k, members) in (1..).zip(&sites) {
        let mut ids = vec![fedmq::server::SERVER_ID.to_string()];
        ids.extend(members.iter().map(|&r| fedmq::client::client_id(r)));
        dirs.push((a.out.join(fedmq::edge::edge_id(&run, k)), ids));
    }
    for (dir, ids) in &dirs {
        for id in ids {
            let key = dir.join(format!("{id}.key"));
            if key.exists() && !a.force {
                bail!("{} exists; pass --force to replace it", key.display());
            }
        }
    }
    write_set(&a.out, &cloud, store.as_ref(), true)?;
    for (k, (dir, ids)) in (1..).zip(dirs.iter().skip(1)) {
        // A device's policy covers its site's run, where its updates go.
        let site_store = store.as_ref().map(|(secret, bucket, _)| {
            let keys = fedmq::proto::BlobKeys::new(
                fedmq::federation::KEY_PREFIX,
                &fedmq::edge::site_run(&run, k),
            );
            (secret.clone(), bucket.clone(), keys.run_prefix())
        });
        // The site's `server` is the edge: it keeps the run's shared store credential, never
        // the cloud server's own.
        write_set(dir, ids, site_store.as_ref(), false)?;
    }
    eprintln!(
        "fedmq keys: the hierarchy of {}: {} edges and {} devices. In {}: server and the \
         edges (fedmq_args.trusted_keys, signing_key \"{}/{{id}}.key\"); in each \
         <run>-edge-<k>/: that site's server (its edge) and devices. Give edge k the cloud \
         directory's <run>-edge-<k>.key and its site directory; a device its site directory.",
        path.display(),
        sites.len(),
        cfg.train_args.client_num_in_total,
        a.out.display(),
        a.out.display()
    );
    Ok(())
}

/// The store secret, bucket and run prefix of the config at `path` (env overrides applied).
fn store_of(path: &std::path::Path) -> Result<(String, String, String)> {
    let cfg = super::load_config(path, LoadMode::Distributed)?;
    let s3 = &cfg.comm_args.customized_training_s3_config;
    if s3.cn_s3_sak.is_empty() {
        bail!(
            "{}: store credentials are derived from the store's secret, which is empty: set \
             comm_args.customized_training_s3_config.CN_S3_SAK or FEDMQ_S3_SAK",
            path.display()
        );
    }
    let run = fedmq::proto::BlobKeys::new(fedmq::federation::KEY_PREFIX, &cfg.common_args.run_id);
    Ok((
        s3.cn_s3_sak.clone(),
        s3.bucket_name.clone(),
        run.run_prefix(),
    ))
}
