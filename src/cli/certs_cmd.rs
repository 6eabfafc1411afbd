//! `fedmq certs`: a local CA and one certificate per participant, for TLS and mutual TLS on
//! the broker and the store. Thin: the work is in [`fedmq::crypto::tls::generate_certs`].

use anyhow::{Context, Result};
use fedmq::crypto::tls::{generate_certs, CertsPlan};
use std::path::PathBuf;
use std::time::Duration;

/// `fedmq certs`: write ca.pem/ca.key and <id>.pem/<id>.key per participant (plus broker and
/// store) into --out. Every certificate is valid as TLS server and client certificate; keys are
/// written with mode 0600. For local and test use: the CA key lies next to what it signed.
#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    /// Directory to write into (created when missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Participant ids, comma-separated (e.g. server,client-1,client-2).
    #[arg(long, value_delimiter = ',', required = true)]
    pub participants: Vec<String>,
    /// Host names and IP addresses the server, broker and store certificates are valid for
    /// (what clients put in BROKER_HOST and CN_S3_ENDPOINT).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,localhost")]
    pub hosts: Vec<String>,
    /// Do not issue the `broker` and `store` certificates.
    #[arg(long)]
    pub no_infrastructure: bool,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    pub days: u64,
    /// Overwrite existing files (a new CA: every certificate must then be replaced).
    #[arg(long)]
    pub force: bool,
}

/// Generates the files and prints one path per line.
pub fn run(a: CertsArgs) -> Result<()> {
    let mut plan = CertsPlan::new(&a.out, a.participants);
    plan.hosts = a.hosts;
    plan.infrastructure = !a.no_infrastructure;
    plan.validity = Duration::from_secs(a.days.max(1) * 24 * 3600);
    plan.force = a.force;
    let files = generate_certs(&plan)
        .with_context(|| format!("writing certificates into {}", a.out.display()))?;
    for f in &files {
        println!("{}", f.display());
    }
    eprintln!(
        "fedmq certs: wrote a CA and {} certificates (valid {} days) into {}; keys are mode \
         0600. Point MQTT_CA_PATH / CN_S3_CA_PATH at ca.pem.",
        plan.subjects().len(),
        a.days.max(1),
        a.out.display()
    );
    Ok(())
}
