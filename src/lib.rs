//! fedmq: federated learning over MQTT (control plane) and S3 (data plane), training with candle.
//!
//! Clients train a shared model on data that never leaves them; a server coordinates rounds.
//!
//! # Layout
//! - [`config`]: `fedml_config.yaml` → typed structs, defaults, validation with file:line errors.
//! - [`data`]: data sets fetched by package name and checked by SHA-256, IDX/CIFAR loaders,
//!   FedML-style partitions (`homo`, `hetero`, `pathological`) and their statistics.
//! - [`train`]: candle models named as FedML's `model_args.model` (`lr`, `mlp`, `cnn`), optimizers,
//!   the local trainer, evaluation and the training benchmark.
//! - [`proto`]: protocol v1: MQTT topics, JSON control messages, blob references, blob keys.
//! - [`store`]: the blob layer over aws-sdk-s3 (multipart, ranged gets, SHA-256 checks, retries,
//!   retention), the sealing decorator over it ([`store::SealedStore`]) and the embedded
//!   S3-compatible server (s3s over fedmq's own object backend).
//! - [`strategy`]: configure/aggregate strategies with streaming aggregation: FedAvg, FedAvgM,
//!   FedProx, FedAdam/FedYogi/FedAdagrad, SCAFFOLD, FedNova, and buffered asynchronous FedBuff.
//! - [`secagg`]: secure aggregation's arithmetic (quantization into `Z_{2^32}`, ChaCha20
//!   masks, Shamir shares of seeds over `GF(2^61 − 1)`); the protocol stages follow (issue 12).
//! - [`server`]: the round engine as a sans-IO state machine, its async driver, the admission of
//!   incoming messages, and checkpoints.
//! - [`client`]: the client runtime, its trainers and the client-side strategy hooks.
//! - [`federation`]: a whole federation in one process (`fedmq run`).
//! - [`attack`]: attacking clients (Byzantine updates, label flipping, backdoors) for measuring
//!   defenses; the defenses are strategies ([`strategy::Defended`], [`strategy::Private`]).
//! - [`privacy`]: the RDP accountant of differential privacy.
//! - [`metrics`]: `metrics.jsonl`/`metrics.csv`, the summary table and SVG plots.
//! - [`bench`]: the benchmark harnesses behind `fedmq bench` (train, blob, mqtt, round,
//!   strategies), beside the product: nothing else depends on them.
//! - [`transport`]: the MQTT session (one event-loop task, cloneable handle, retained presence,
//!   reconnect/resubscribe), the embedded rumqttd broker and its authorizing gateway.
//! - [`crypto`]: the crypto layer.
//!   - [`crypto::identity`]: Ed25519 identities, key rings and message signatures.
//!   - [`crypto::seal`]: sealed blobs (AEAD content keys wrapped per recipient).
//!   - [`crypto::tls`]: rustls configurations (ring) from PEM files, handshake-failure
//!     explanations, and the local CA of `fedmq certs`.
//! - [`tensor`]: model parameters ↔ safetensors bytes in memory, with SHA-256 digests.
//! - `cli` (binary only): the `fedmq` command line.
#![warn(missing_docs)]

pub mod attack;
pub mod bench;
pub mod client;
pub mod config;
pub mod crypto;
pub mod data;
pub mod deploy;
pub mod edge;
pub mod federation;
pub mod health;
pub mod metrics;
pub mod privacy;
pub mod proto;
pub mod secagg;
pub mod server;
pub mod store;
pub mod strategy;
pub mod tensor;
pub mod train;
pub mod transport;
