//! The scenarios beyond images, end to end on real components (embedded broker and store, one
//! MQTT session and one S3 client per participant): federated matrix factorization whose user
//! factors never leave the clients, and models refused on data they cannot take.
//!
//! The ratings are a small synthetic MovieLens-format file (`ml-100k.inter`) written into a
//! temporary data directory, so the test needs no download.

use fedmq::config::Config;
use fedmq::data::DataSpec;
use fedmq::federation::{self, LocalOptions};
use fedmq::server::Outcome;
use fedmq::strategy::{self, ClientFailure, FedAvg, Report, RoundAggregate, Strategy};
use fedmq::tensor::{ParamSet, ParamsView};
use fedmq::train::{init_model, Registry};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

const USERS: usize = 12;
const ITEMS: usize = 40;
const PER_USER: usize = 20;

/// A MovieLens-format ratings file of `USERS` users who each rate `PER_USER` of `ITEMS` items,
/// drawn from a rank-2 model with user and item biases, rounded to whole stars.
fn write_ratings(data_dir: &Path) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut normal = || -> f64 { (0..12).map(|_| rng.random::<f64>()).sum::<f64>() - 6.0 };
    let users: Vec<[f64; 3]> = (0..USERS)
        .map(|_| [normal(), normal(), 0.5 * normal()])
        .collect();
    let items: Vec<[f64; 3]> = (0..ITEMS)
        .map(|_| [normal(), normal(), 0.5 * normal()])
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
    let mut text = String::from("user_id:token\titem_id:token\trating:float\ttimestamp:float\n");
    for (u, p) in users.iter().enumerate() {
        let rated = rand::seq::index::sample(&mut rng, ITEMS, PER_USER);
        for (t, i) in rated.into_iter().enumerate() {
            let q = items[i];
            let r = 3.2 + 0.5 * (p[0] * q[0] + p[1] * q[1]) + p[2] + q[2];
            let r = r.round().clamp(1.0, 5.0);
            text.push_str(&format!("{}\t{}\t{r}\t{}\n", u + 1, i + 1, 1000 + t));
        }
    }
    let dir = data_dir.join("ml-100k");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ml-100k.inter"), text).unwrap();
}

fn config(run: &str, data_dir: &Path, model: &str, rounds: usize) -> Config {
    let mut c = Config::default();
    c.common_args.run_id = run.into();
    c.model_args.model = model.into();
    c.data_args.dataset = "movielens_100k".into();
    c.data_args.data_cache_dir = data_dir.display().to_string();
    c.data_args.auto_fetch = false;
    c.data_args.partition_method = "natural".into();
    c.data_args.partition_min_samples = 1;
    c.train_args.client_num_in_total = USERS;
    c.train_args.client_num_per_round = USERS;
    c.train_args.comm_round = rounds;
    c.train_args.epochs = 5;
    c.train_args.batch_size = 8;
    c.train_args.client_optimizer = "sgd".into();
    c.train_args.learning_rate = 0.1;
    c.train_args.momentum = 0.0;
    c.comm_args.customized_training_s3_config.cn_s3_aki = "fedmq".into();
    c.comm_args.customized_training_s3_config.cn_s3_sak = "scenario-test-secret".into();
    c.validate().expect("valid test config");
    c
}

/// FedAvg that records the name of every tensor any client's update carried to the server.
struct Recording {
    inner: FedAvg,
    seen: Arc<Mutex<BTreeSet<String>>>,
}

struct RecordingRound {
    inner: Box<dyn RoundAggregate>,
    seen: Arc<Mutex<BTreeSet<String>>>,
}

impl Strategy for Recording {
    fn name(&self) -> &'static str {
        "FedAvg"
    }

    fn begin_round(&mut self, round: u64, global: &ParamSet) -> Box<dyn RoundAggregate> {
        Box::new(RecordingRound {
            inner: self.inner.begin_round(round, global),
            seen: Arc::clone(&self.seen),
        })
    }

    fn set_row_sparse(&mut self, tensors: BTreeSet<String>, step_cap: u32) -> bool {
        self.inner.set_row_sparse(tensors, step_cap)
    }
}

impl RoundAggregate for RecordingRound {
    fn add(
        &mut self,
        client: &str,
        update: &ParamsView<'_>,
        num_samples: u64,
        report: &Report,
    ) -> strategy::Result<()> {
        let mut seen = self.seen.lock().unwrap();
        seen.extend(update.tensors().iter().map(|t| t.name().to_string()));
        drop(seen);
        self.inner.add(client, update, num_samples, report)
    }

    fn count(&self) -> usize {
        self.inner.count()
    }

    fn metrics(&self) -> BTreeMap<String, f64> {
        self.inner.metrics()
    }

    fn finish(self: Box<Self>, failures: &[ClientFailure]) -> Option<ParamSet> {
        self.inner.finish(failures)
    }
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn matrix_factorization_keeps_user_factors_on_the_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    write_ratings(&data_dir);
    let out = tmp.path().join("out");
    let cfg = config("mf", &data_dir, "mf", 4);
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let strategy = Recording {
        inner: FedAvg::default(),
        seen: Arc::clone(&seen),
    };
    let report = federation::run_local_with(
        &cfg,
        &LocalOptions::new(out.clone()),
        Box::new(strategy),
        |_| {},
        CancellationToken::new(),
    )
    .await
    .expect("federation");
    let s = &report.server;
    assert_eq!(s.outcome, Outcome::Completed);
    assert_eq!(s.records.len(), 4);

    // The server saw, and the global model holds, only the shared tensors.
    let shared: BTreeSet<String> = ["global_bias", "item_bias.weight", "item_embedding.weight"]
        .map(String::from)
        .into();
    assert_eq!(*seen.lock().unwrap(), shared);
    let names: BTreeSet<String> = s
        .final_params
        .tensors()
        .iter()
        .map(|t| t.name().to_string())
        .collect();
    assert_eq!(names, shared);

    // The clients measured the model on their own held-out ratings every round, and it learned.
    let rmse: Vec<f64> = s
        .records
        .iter()
        .map(|r| r.strategy["client_test_rmse"])
        .collect();
    assert!(rmse.iter().all(|x| x.is_finite() && *x > 0.0), "{rmse:?}");
    assert!(rmse[3] < rmse[0], "clients' test RMSE falls: {rmse:?}");
    let test_samples = s.records[0].strategy["client_test_samples"];
    assert_eq!(test_samples, (USERS * PER_USER / 5) as f64);

    // Each client kept the user table on its disk; it changed exactly one row, its own user's,
    // and no two clients changed the same row.
    let spec = DataSpec {
        input: fedmq::data::Input::Ids {
            cardinalities: vec![USERS, ITEMS],
        },
        sample_shape: vec![2],
        target: fedmq::data::Target::Real { min: 1.0, max: 5.0 },
    };
    let def = Registry::default().get("mf").unwrap();
    let init = init_model(def.as_ref(), &spec, cfg.common_args.random_seed).unwrap();
    let init_users = init.get("user_embedding.weight").unwrap();
    let mut own_rows: Vec<Vec<u8>> = Vec::new();
    let mut owners = BTreeSet::new();
    for id in 1..=USERS {
        let path = out
            .join("clients")
            .join(format!("client-{id}"))
            .join(fedmq::client::LOCAL_PARAMS_FILE);
        let local = ParamSet::from_safetensors_bytes(&std::fs::read(&path).unwrap()).unwrap();
        let users = local.get("user_embedding.weight").unwrap();
        assert_eq!(users.shape(), init_users.shape());
        let k = users.shape()[1];
        let changed: Vec<usize> = (0..USERS)
            .filter(|&u| users.data()[u * k..(u + 1) * k] != init_users.data()[u * k..(u + 1) * k])
            .collect();
        assert_eq!(changed.len(), 1, "client-{id} changed rows {changed:?}");
        assert!(
            owners.insert(changed[0]),
            "row {} changed twice",
            changed[0]
        );
        let row = &users.data()[changed[0] * k..(changed[0] + 1) * k];
        own_rows.push(row.iter().flat_map(|x| x.to_le_bytes()).collect());
    }

    // No stored object (updates, global models, checkpoints) holds any client's user factors.
    let stored = files(&out.join("store"));
    assert!(!stored.is_empty());
    for f in &stored {
        let raw = std::fs::read(f).unwrap();
        for row in &own_rows {
            assert!(
                !raw.windows(row.len()).any(|w| w == row.as_slice()),
                "{} holds a client's user factors",
                f.display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_is_refused_on_data_it_cannot_take_before_any_round() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    write_ratings(&data_dir);
    for model in ["cnn", "rnn"] {
        let cfg = config(&format!("refused-{model}"), &data_dir, model, 1);
        let err = federation::run_local(
            &cfg,
            &LocalOptions::new(tmp.path().join(model)),
            |_| {},
            CancellationToken::new(),
        )
        .await
        .expect_err("refused");
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!("model `{model}` cannot take ids")) && msg.contains("takes"),
            "{msg}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_ratings_file_is_named_with_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config("missing", &tmp.path().join("empty"), "mf", 1);
    let err = federation::run_local(
        &cfg,
        &LocalOptions::new(tmp.path().join("out")),
        |_| {},
        CancellationToken::new(),
    )
    .await
    .expect_err("no data");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("ml-100k.inter")
            && msg.contains("auto_fetch")
            && msg.contains("fedmq data fetch"),
        "{msg}"
    );
}
