//! The whole hierarchy in one process (`fedmq run` with `federated_optimizer: HierarchicalFL`):
//! `group_num` edges, each with its site's devices, every participant with its own MQTT session,
//! store client and fresh identity, on the broker and store of the local federation.

use super::{edge_id, run_edge, site_config, sites, EdgeParts};
use crate::client::{self, ClientReport};
use crate::data::{DataSplit, Partition};
use crate::federation::{
    client_trainer, local_training, log_ephemeral, LocalClient, LocalClients, LocalInfra, Security,
};
use crate::store::BlobStore;
use crate::train::{self, ModelRef};
use anyhow::Result;
use std::path::Path;

/// The data and model every device trains.
pub struct Data<'a> {
    /// Train and test sets.
    pub split: &'a DataSplit,
    /// Each device's samples (ranks 1..=N, as in a flat federation of the same config).
    pub part: &'a Partition,
    /// The model.
    pub model: &'a ModelRef,
}

/// Starts every edge and device of `infra.cfg`'s hierarchy into `clients` (edges report their
/// cloud client's report); returns the cloud server's security. A site's metrics go to
/// `output_dir/edges/edge-<k>/`, its devices' state to `output_dir/clients/<id>/`.
///
/// # Errors
/// A device's trainer cannot be built, or a store client cannot be set up.
pub fn spawn_hierarchy(
    infra: &LocalInfra,
    data: Data<'_>,
    output_dir: &Path,
    clients: &mut LocalClients<ClientReport>,
) -> Result<Security> {
    let cfg = &infra.cfg;
    let groups = sites(cfg);
    let run = &cfg.common_args.run_id;
    let edge_ids: Vec<String> = (1..=groups.len()).map(|k| edge_id(run, k)).collect();
    let (cloud_sec, edge_secs) = Security::ephemeral(&edge_ids, cfg.fedmq_args.encrypt_blobs)?;
    log_ephemeral(&cloud_sec);
    let (slots, threads) = local_training(cfg, cfg.train_args.client_num_in_total);
    let (device, desc) = train::select_device(cfg.device_args.using_gpu, cfg.device_args.gpu_id);
    for ((k, members), edge_sec) in (1..).zip(&groups).zip(edge_secs) {
        let site_cfg = site_config(cfg, k);
        let site_run = site_cfg.common_args.run_id.clone();
        let ids: Vec<String> = members.iter().map(|&r| client::client_id(r)).collect();
        let (site_sec, device_secs) = Security::ephemeral(&ids, cfg.fedmq_args.encrypt_blobs)?;
        for (&rank, sec) in members.iter().zip(device_secs) {
            let id = client::client_id(rank);
            let state_dir = output_dir.join("clients").join(&id);
            let trainer = client_trainer(
                cfg,
                data.model,
                rank,
                data.split,
                data.part,
                &state_dir,
                device.clone(),
                threads,
            )?;
            let device = LocalClient {
                run: &site_run,
                id: &id,
                device: &desc,
                slots: &slots,
            };
            device.spawn(infra, trainer, sec, clients)?;
        }
        let id = edge_id(run, k);
        let parts = EdgeParts {
            site: k,
            cfg: cfg.clone(),
            site_store: BlobStore::connect(&infra.server_store()?)?,
            cloud_store: BlobStore::connect(&infra.participant_store(&id)?)?,
            site_mqtt: infra.session(&id),
            cloud_mqtt: infra.session(&id),
            site_security: site_sec,
            cloud_security: edge_sec,
            output_dir: Some(output_dir.join("edges").join(&id)),
            health: None,
        };
        let cancel = clients.cancel_token();
        clients.spawn(async move {
            let report = run_edge(parts, |_| {}, cancel).await?;
            report.cloud.map_err(|e| anyhow::anyhow!(e))
        });
    }
    Ok(cloud_sec)
}
