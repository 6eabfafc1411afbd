//! A corpus of configs written the way FedML's examples write `fedml_config.yaml` (cross-silo,
//! cross-device, simulation, attack, defense, DP, secure aggregation, FedNova, hierarchical, ...)
//! in `tests/fedml_corpus/`: each loads, with one warning per FedML key fedmq does not use; the
//! broker and store files named by `comm_args.mqtt_config_path` / `s3_config_path` are read; and
//! the configs in `tests/fedml_corpus/errors/` (typos, switched-on features fedmq lacks, unknown
//! names) fail with messages that point at the fix. FedML's own MQTT_S3 MNIST + `lr` cross-silo
//! configs (`tests/fedml_corpus/fedml/`, copied from FedML's repository) load for a local run as
//! they are, with warnings that name the keys fedmq does not use.

use fedmq::config::{Config, ConfigError, LoadMode, MASK};
use std::path::{Path, PathBuf};
use std::process::Command;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fedml_corpus")
}

/// FedML's separate broker and store files, which the corpus configs name.
const COMPANIONS: [&str; 2] = ["mqtt_config.yaml", "s3_config.yaml"];

/// The `.yaml` files directly in `dir`, sorted, without the companion files.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml"))
        .filter(|p| !COMPANIONS.iter().any(|c| p.file_name().unwrap() == *c))
        .collect();
    files.sort();
    files
}

fn corpus(name: &str) -> PathBuf {
    corpus_dir().join(name)
}

fn load(name: &str) -> Config {
    let path = corpus(name);
    Config::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The warning about FedML key `dotted` (e.g. `tracking_args.wandb_name`) in `cfg`.
fn warning<'a>(cfg: &'a Config, name: &str, dotted: &str) -> &'a str {
    let needle = format!(": {dotted} is a FedML key fedmq ignores: ");
    cfg.ignored_keys
        .iter()
        .find(|w| w.contains(&needle))
        .unwrap_or_else(|| panic!("{name}: no warning for {dotted}: {:#?}", cfg.ignored_keys))
}

fn no_warning(cfg: &Config, name: &str, dotted: &str) {
    let needle = format!(": {dotted} is a FedML key");
    assert!(
        !cfg.ignored_keys.iter().any(|w| w.contains(&needle)),
        "{name}: {dotted} is read by fedmq, yet warned about: {:#?}",
        cfg.ignored_keys
    );
}

/// Every corpus config loads (parse, FedML companion files, validation), and every warning is
/// `file:line: section.key is a FedML key fedmq ignores: why`, with `line` holding that key.
#[test]
fn every_corpus_config_loads_with_one_warning_per_fedml_key() {
    let files = yaml_files(&corpus_dir());
    assert!(files.len() >= 24, "{} corpus configs", files.len());
    let mut failures = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let cfg = match Config::load(path) {
            Ok(cfg) => cfg,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        // Every corpus file carries FedML-only keys (tracking, platform, backend, ...).
        assert!(!cfg.ignored_keys.is_empty(), "{name}: no warnings");
        let text = std::fs::read_to_string(path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let prefix = format!("{}:", path.display());
        for w in &cfg.ignored_keys {
            let rest = w
                .strip_prefix(&prefix)
                .unwrap_or_else(|| panic!("{name}: warning without the file: {w}"));
            let (line, rest) = rest.split_once(": ").unwrap();
            let line: usize = line
                .parse()
                .unwrap_or_else(|_| panic!("{name}: no line: {w}"));
            let (dotted, why) = rest
                .split_once(" is a FedML key fedmq ignores: ")
                .unwrap_or_else(|| panic!("{name}: {w}"));
            assert!(!why.trim().is_empty(), "{name}: no reason: {w}");
            let key = dotted.rsplit('.').next().unwrap();
            let at = lines[line - 1].trim_start();
            assert!(
                at.strip_prefix(key)
                    .is_some_and(|r| r.trim_start().starts_with(':')),
                "{name}: warning names line {line} for {dotted}, which holds {at:?}"
            );
        }
        let mut unique = cfg.ignored_keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), cfg.ignored_keys.len(), "{name}: duplicates");
    }
    assert!(
        failures.is_empty(),
        "configs that fail:\n{}",
        failures.join("\n")
    );
}

/// The corpus covers FedML's kinds of examples, and the sections of its security and privacy
/// examples are there with their switches off.
#[test]
fn corpus_covers_fedml_example_kinds_and_switched_off_sections() {
    let names: Vec<String> = yaml_files(&corpus_dir())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for kind in [
        "cross_silo",
        "cross_device",
        "simulation",
        "attack",
        "defense",
        "dp",
        "secagg",
        "fednova",
        "hierarchical",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(kind)),
            "no {kind} config in {names:?}"
        );
    }
    for (section, switch) in [
        ("attack_args", "enable_attack"),
        ("defense_args", "enable_defense"),
        ("dp_args", "enable_dp"),
        ("fhe_args", "enable_fhe"),
    ] {
        let with: Vec<&String> = names
            .iter()
            .filter(|n| {
                let text = std::fs::read_to_string(corpus(n)).unwrap();
                text.contains(&format!("\n{section}:\n  {switch}: false"))
                    || text.contains(&format!("\n{section}:\n  {switch}: False"))
            })
            .collect();
        assert!(!with.is_empty(), "no config with {section}.{switch}: false");
        for n in with {
            let cfg = load(n);
            if section == "fhe_args" {
                assert!(warning(&cfg, n, section).contains("not in fedmq yet"));
            } else {
                // fedmq's own sections now: read, switched off, no warning for the section.
                no_warning(&cfg, n, section);
                assert!(
                    !(cfg.attack_args.enable_attack
                        || cfg.defense_args.enable_defense
                        || cfg.dp_args.enable_dp),
                    "{n}"
                );
            }
        }
    }
}

/// Warnings say why, by theme; keys fedmq reads give none.
#[test]
fn warnings_name_why_the_key_is_ignored() {
    let n = "cross_silo_mqtt_s3_mnist_lr_one_line.yaml";
    let cfg = load(n);
    assert!(warning(&cfg, n, "tracking_args.wandb_name").contains("tracking"));
    assert!(warning(&cfg, n, "comm_args.grpc_ipconfig_path").contains("MQTT_S3"));
    for read in [
        "common_args.scenario",
        "common_args.config_version",
        "environment_args.bootstrap",
        "model_args.global_model_file_path",
        "device_args.gpu_mapping_file",
        "tracking_args.enable_wandb",
        "tracking_args.wandb_key",
        "comm_args.mqtt_config_path",
    ] {
        no_warning(&cfg, n, read);
    }

    let n = "hierarchical.yaml";
    let cfg = load(n);
    assert!(warning(&cfg, n, "dist_training_args").contains("device_args.using_gpu"));
    assert!(warning(&cfg, n, "private_config_paths").contains("platform"));
    assert!(warning(&cfg, n, "comm_args.trpc_master_config_path").contains("MQTT_S3"));
    assert!(warning(&cfg, n, "tracking_args.local_log_output_path").contains("tracking"));
    no_warning(&cfg, n, "tracking_args.log_file_dir");

    let n = "simulation_sp_custom_optim.yaml";
    let cfg = load(n);
    assert!(warning(&cfg, n, "fedprox_args").contains("train_args.fedprox_mu"));
    assert!(warning(&cfg, n, "fednova_args").contains("not in fedmq yet"));
    assert!(warning(&cfg, n, "feddyn_args").contains("not in fedmq yet"));
    assert!(warning(&cfg, n, "train_args.initialize_all_clients").contains("trainer"));
    assert!(warning(&cfg, n, "device_args.process_id").contains("device_args.using_gpu"));
    no_warning(&cfg, n, "train_args.server_momentum");

    let n = "simulation_mpi_scheduler.yaml";
    let cfg = load(n);
    assert!(warning(&cfg, n, "device_args.gpu_util_parse").contains("gpu_id"));
    assert!(warning(&cfg, n, "tracking_args.simulation_schedule").contains("MPI"));

    let n = "fednova.yaml";
    let cfg = load(n);
    for k in ["lr", "wd", "ci"] {
        warning(&cfg, n, &format!("train_args.{k}"));
    }
    no_warning(&cfg, n, "train_args.momentum");
    no_warning(&cfg, n, "train_args.server_lr");

    let cfg = load("fhe_ckks.yaml");
    assert!(warning(&cfg, "fhe_ckks.yaml", "fhe_args").contains("switched off"));
    // FedML's keys of the attack, defense and DP sections fedmq does not use warn one by one.
    let cfg = load("dp_cdp.yaml");
    assert!(warning(&cfg, "dp_cdp.yaml", "dp_args.rdp_alpha").contains("RDP accountant"));
    no_warning(&cfg, "dp_cdp.yaml", "dp_args.epsilon");
    let cfg = load("defense_slsgd.yaml");
    warning(&cfg, "defense_slsgd.yaml", "defense_args.option_type");
    no_warning(&cfg, "defense_slsgd.yaml", "defense_args.trim_param_b");
    assert_eq!(
        load("dp_dpfedavg.yaml").dp_args.stop_training_at_epsilon,
        Some(fedmq::config::EpsilonStop::Switch(false))
    );
}

/// The values fedmq uses come through from FedML's keys.
#[test]
fn fedml_keys_fedmq_reads_take_effect() {
    let cfg = load("simulation_mpi_fedprox_mnist_lr.yaml");
    assert_eq!(cfg.train_args.federated_optimizer, "FedProx");
    assert_eq!(cfg.train_args.fedprox_mu, Some(0.1));
    assert_eq!(cfg.train_args.client_num_in_total, 1000);
    assert_eq!(cfg.train_args.client_num_per_round, 4);

    let cfg = load("simulation_sp_fedopt_mnist_lr.yaml");
    assert_eq!(cfg.train_args.federated_optimizer, "FedOpt");
    assert_eq!(cfg.train_args.server_optimizer, "adam");
    // FedML writes `server_lr : 0.001` (a space before the colon).
    assert_eq!(cfg.train_args.server_lr, Some(0.001));

    let cfg = load("secagg_lightsecagg.yaml");
    assert!(
        cfg.secure_aggregation(),
        "enable_sa and federated_optimizer LSA"
    );
    assert_eq!(cfg.secure_aggregation_args.sa_method, "lightsecagg");
    assert_eq!(cfg.secure_aggregation_args.prime_number, Some(1997));
    assert!(cfg.light_secagg(), "sa_method lightsecagg runs LightSecAgg");
    let notes: Vec<&str> = cfg.warnings().collect();
    assert!(
        notes
            .iter()
            .any(|w| w.contains("prime_number") && w.contains("not used")),
        "{notes:#?}"
    );
    assert_eq!(cfg.lsa_args.prime_number, 32749);
    assert_eq!(cfg.lsa_args.precision_parameter, 10);
    assert_eq!(cfg.lsa_args.privacy_guarantee, Some(2));

    let cfg = load("fednova.yaml");
    assert_eq!(cfg.train_args.momentum, 0.0);
    assert_eq!(cfg.train_args.client_optimizer, "sgd");
    assert_eq!(cfg.train_args.learning_rate, 0.03);
    assert_eq!(cfg.train_args.weight_decay, 0.001);

    let cfg = load("cross_device_mnn.yaml");
    assert_eq!(cfg.common_args.training_type, "cross_device");
    assert_eq!(
        cfg.train_args.client_id_list,
        Some(serde_yaml_ng::Value::String("[138]".into()))
    );

    let cfg = load("simulation_mpi_scheduler.yaml");
    assert_eq!(cfg.data_args.dataset, "fashion_mnist");
    assert_eq!(cfg.model_args.model, "cnn");
    assert_eq!(cfg.tracking_args.log_file_dir, "./log");
}

/// `comm_args.mqtt_config_path` / `s3_config_path` files (FedML's format) fill the broker and
/// store settings; keys set inline in the config win over the files'.
#[test]
fn mqtt_and_s3_config_files_are_read() {
    for n in [
        "cross_silo_mqtt_s3_mnist_lr.yaml",
        "flow_fedavg.yaml",
        "cross_device_mnn.yaml",
    ] {
        let cfg = load(n);
        let m = &cfg.comm_args.customized_training_mqtt_config;
        assert_eq!(m.broker_host, "broker.corpus.test", "{n}");
        assert_eq!(m.broker_port, 1883, "{n}");
        assert_eq!(m.mqtt_user, "corpus-user", "{n}");
        assert_eq!(m.mqtt_pwd, "corpus-password", "{n}");
        assert_eq!(m.mqtt_keepalive, 120, "{n}");
        let s = &cfg.comm_args.customized_training_s3_config;
        assert_eq!(s.bucket_name, "fedml-corpus", "{n}");
        assert_eq!(s.cn_region_name, "us-west-1", "{n}");
        // FedML leaves the credentials empty in the file: the defaults stay.
        assert_eq!(s.cn_s3_aki, "fedmq", "{n}");
        assert_eq!(s.cn_s3_sak, "", "{n}");
        assert_eq!(s.cn_s3_endpoint, "", "{n}");
    }

    let cfg = load("cross_silo_mqtt_s3_custom_data_and_model.yaml");
    let m = &cfg.comm_args.customized_training_mqtt_config;
    assert_eq!(m.broker_host, "mqtt.silo.test", "inline wins");
    assert_eq!(m.mqtt_pwd, "inline-password", "inline wins");
    assert_eq!(m.mqtt_keepalive, 180, "inline wins");
    assert_eq!(m.broker_port, 1883, "from the file");
    assert_eq!(m.mqtt_user, "corpus-user", "from the file");
    let s = &cfg.comm_args.customized_training_s3_config;
    assert_eq!(s.bucket_name, "silo-bucket", "inline wins");
    assert_eq!(s.cn_s3_aki, "silo-access-key", "inline wins");
    assert_eq!(s.cn_s3_endpoint, "http://127.0.0.1:9000", "inline");
    assert_eq!(s.cn_region_name, "us-west-1", "from the file");

    // Empty paths (FedML's "one line" examples): no file is read, the defaults stay.
    let cfg = load("cross_silo_mqtt_s3_mnist_lr_one_line.yaml");
    let m = &cfg.comm_args.customized_training_mqtt_config;
    assert_eq!((m.broker_host.as_str(), m.broker_port), ("127.0.0.1", 0));
    assert_eq!(
        cfg.comm_args.customized_training_s3_config.bucket_name,
        "fedmq"
    );
}

/// What a config in `errors/` must fail with.
enum Expect {
    /// An unknown key: the message starts with `file:line:` of the key as written (in `file`,
    /// the config itself unless given) and contains `hint`.
    UnknownKey {
        key: &'static str,
        file: Option<&'static str>,
        hint: &'static str,
    },
    /// Values that parse but cannot be used: the message contains all of these.
    Invalid(&'static [&'static str]),
    /// A file the config names cannot be read: the message contains all of these.
    Referenced(&'static [&'static str]),
}

const ERRORS: &[(&str, Expect)] = &[
    (
        "typo_learning_rate.yaml",
        Expect::UnknownKey {
            key: "learning_rat",
            file: None,
            hint: "did you mean `learning_rate`?",
        },
    ),
    (
        "typo_comm_round.yaml",
        Expect::UnknownKey {
            key: "comm_rounds",
            file: None,
            hint: "did you mean `comm_round`?",
        },
    ),
    (
        "typo_section.yaml",
        Expect::UnknownKey {
            key: "trian_args",
            file: None,
            hint: "did you mean `train_args`?",
        },
    ),
    (
        "typo_broker_port.yaml",
        Expect::UnknownKey {
            key: "BROKER_PROT",
            file: None,
            hint: "did you mean `BROKER_PORT`?",
        },
    ),
    (
        "misplaced_key.yaml",
        Expect::UnknownKey {
            key: "learning_rate",
            file: None,
            hint: "`learning_rate` belongs in section `train_args`",
        },
    ),
    (
        "typo_in_mqtt_config_file.yaml",
        Expect::UnknownKey {
            key: "BROKER_PROT",
            file: Some("companion/mqtt_config.yaml"),
            hint: "did you mean `BROKER_PORT`? (valid keys: BROKER_HOST, BROKER_PORT, MQTT_USER",
        },
    ),
    (
        "unknown_key_in_s3_config_file.yaml",
        Expect::UnknownKey {
            key: "BUCKET",
            file: Some("companion/s3_config.yaml"),
            hint: "valid keys here: BUCKET_NAME, CN_S3_AKI, CN_S3_SAK, CN_REGION_NAME",
        },
    ),
    (
        "dp_switch_misspelled.yaml",
        Expect::UnknownKey {
            key: "enable_dpp",
            file: None,
            hint: "in section `dp_args`; did you mean `enable_dp`?",
        },
    ),
    (
        "async_without_fedbuff.yaml",
        Expect::Invalid(&[
            "train_args.is_async: true",
            "\"FedAvg\"",
            "set `federated_optimizer: FedBuff`",
        ]),
    ),
    (
        "dp_negative_epsilon.yaml",
        Expect::Invalid(&["dp_args.epsilon must be a positive number, got -0.5"]),
    ),
    (
        "defense_krum_too_many.yaml",
        Expect::Invalid(&[
            "defense_args.byzantine_client_num",
            "2f + 2",
            "client_num_per_round ≥ 5, which is 2",
        ]),
    ),
    (
        "unknown_optimizer.yaml",
        Expect::Invalid(&[
            "train_args.federated_optimizer",
            "\"FedGKT\" is not a strategy fedmq knows",
        ]),
    ),
    (
        "unknown_dataset.yaml",
        Expect::Invalid(&["data_args.dataset", "`femnist`", "mnist", "cifar10"]),
    ),
    (
        "backend_sp.yaml",
        Expect::Invalid(&["comm_args.backend", "\"sp\"", "MQTT_S3"]),
    ),
    (
        "missing_mqtt_config.yaml",
        Expect::Referenced(&[
            "comm_args.mqtt_config_path",
            "example/config/mqtt_config.yaml",
        ]),
    ),
];

/// Typos are still caught (file:line and the closest valid key); switched-on FedML features and
/// unknown optimizers, data sets and backends are errors that name the key and the valid values.
#[test]
fn error_configs_fail_pointing_at_the_fix() {
    let dir = corpus_dir().join("errors");
    let files = yaml_files(&dir);
    assert!(files.len() >= 5);
    for path in &files {
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(
            ERRORS.iter().any(|(n, _)| *n == name),
            "{name} has no expectation in ERRORS"
        );
    }
    for (name, expect) in ERRORS {
        let path = dir.join(name);
        let err = match Config::load(&path) {
            Ok(_) => panic!("{name} loaded"),
            Err(e) => e,
        };
        let msg = err.to_string();
        match expect {
            Expect::UnknownKey { key, file, hint } => {
                assert!(matches!(err, ConfigError::UnknownKey(_)), "{name}: {err:?}");
                let file = file.map_or(path.clone(), |f| dir.join(f));
                let text = std::fs::read_to_string(&file).unwrap();
                let line = 1 + text
                    .lines()
                    .position(|l| l.trim_start().starts_with(&format!("{key}:")))
                    .unwrap_or_else(|| panic!("{name}: {key} not in {}", file.display()));
                let at = format!("{}:{line}:", file.display());
                assert!(msg.starts_with(&at), "{name}: expected {at}: {msg}");
                assert!(msg.contains(&format!("`{key}`")), "{name}: {msg}");
                assert!(msg.contains(hint), "{name}: expected {hint:?}: {msg}");
            }
            Expect::Invalid(parts) => {
                assert!(
                    matches!(err, ConfigError::Invalid { .. }),
                    "{name}: {err:?}"
                );
                for p in *parts {
                    assert!(msg.contains(p), "{name}: expected {p:?}: {msg}");
                }
                // An unknown optimizer is answered with every one fedmq has.
                if msg.contains("train_args.federated_optimizer") {
                    for s in fedmq::strategy::STRATEGIES {
                        assert!(msg.contains(s), "{name}: {s} not listed: {msg}");
                    }
                }
            }
            Expect::Referenced(parts) => {
                assert!(
                    matches!(err, ConfigError::Referenced { .. }),
                    "{name}: {err:?}"
                );
                for p in *parts {
                    assert!(msg.contains(p), "{name}: expected {p:?}: {msg}");
                }
            }
        }
    }
}

fn fedmq_config_check(path: &Path) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedmq"));
    cmd.args(["config", "check"]).arg(path);
    for (k, _) in fedmq::config::ENV_OVERRIDES {
        cmd.env_remove(k);
    }
    cmd.env_remove("RUST_LOG");
    cmd.output().expect("running fedmq")
}

/// `fedmq config check <file>` on a corpus config: exit 0, one `warning:` line per ignored key
/// on stderr, the effective configuration (and no warning) on stdout. On an error config: a
/// failure naming file:line.
#[test]
fn config_check_binary_warns_on_stderr() {
    let path = corpus("cross_silo_mqtt_s3_mnist_lr_one_line.yaml");
    let cfg = Config::load(&path).unwrap();
    let out = fedmq_config_check(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stderr}", out.status);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(warnings.len(), cfg.ignored_keys.len(), "{stderr}");
    for w in &cfg.ignored_keys {
        assert!(
            warnings.contains(&format!("warning: {w}").as_str()),
            "{w}: {stderr}"
        );
    }
    assert!(stderr.contains("tracking_args.wandb_name"), "{stderr}");
    assert!(
        stderr.contains(&format!("{}: ok", path.display())),
        "{stderr}"
    );
    assert!(!stdout.contains("warning"), "{stdout}");
    assert!(stdout.contains("train_args:") && stdout.contains("learning_rate: 0.03"));

    let bad = corpus_dir().join("errors/typo_learning_rate.yaml");
    let out = fedmq_config_check(&bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let line = 1 + std::fs::read_to_string(&bad)
        .unwrap()
        .lines()
        .position(|l| l.trim_start().starts_with("learning_rat:"))
        .unwrap();
    let at = format!("{}:{line}:3: unknown key `learning_rat`", bad.display());
    assert!(stderr.contains(&at), "{stderr}");
}

fn fedml_dir() -> PathBuf {
    corpus_dir().join("fedml")
}

/// FedML's own MQTT_S3 MNIST + `lr` cross-silo configs (`tests/fedml_corpus/fedml/README.md`
/// says where each comes from) load as `fedmq run` loads them: the values fedmq uses come
/// through, `~` is the home directory, every FedML key fedmq does not use is one warning, and the
/// broker and store files they name (which FedML does not ship beside them) are one warning each,
/// naming the key. The wandb key they carry is masked in the printed configuration.
#[test]
fn fedml_mqtt_s3_mnist_lr_examples_load_for_a_local_run() {
    let files = yaml_files(&fedml_dir());
    assert_eq!(files.len(), 4, "{files:?}");
    let home = dirs::home_dir().unwrap();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let cfg = Config::load_for(path, LoadMode::Local).unwrap_or_else(|e| panic!("{name}: {e}"));
        let t = &cfg.train_args;
        assert_eq!(cfg.data_args.dataset, "mnist", "{name}");
        assert_eq!(cfg.model_args.model, "lr", "{name}");
        assert_eq!(t.federated_optimizer, "FedAvg", "{name}");
        assert_eq!(t.client_optimizer, "sgd", "{name}");
        assert_eq!(t.client_num_per_round, 2, "{name}");
        assert_eq!(
            Path::new(&cfg.data_args.data_cache_dir),
            home.join(".cache/fedml_data"),
            "{name}"
        );
        // FedML keys fedmq does not use: one warning each, naming the key.
        let expected: &[&str] = match name.as_str() {
            "mqtt_s3_fedavg_mnist_lr_one_line.yaml" => {
                &["comm_args.grpc_ipconfig_path", "tracking_args.wandb_name"]
            }
            "mqtt_s3_fedavg_horizontal_mnist_lr_one_line.yaml" => &[
                "comm_args.trpc_master_config_path",
                "tracking_args.local_log_output_path",
                "tracking_args.wandb_name",
            ],
            _ => &["tracking_args.wandb_name"],
        };
        for k in expected {
            warning(&cfg, &name, k);
        }
        assert_eq!(
            cfg.ignored_keys.len(),
            expected.len(),
            "{name}: {:#?}",
            cfg.ignored_keys
        );
        // The broker and store files: named (not empty) only in two of them.
        let named = name.contains("step_by_step") || name.contains("custom_data");
        let text = std::fs::read_to_string(path).unwrap();
        let line_of = |k: &str| {
            1 + text
                .lines()
                .position(|l| l.trim_start().starts_with(k))
                .unwrap()
        };
        if named {
            assert_eq!(
                cfg.unused_locally.len(),
                2,
                "{name}: {:#?}",
                cfg.unused_locally
            );
            for (w, key, file) in [
                (
                    &cfg.unused_locally[0],
                    "mqtt_config_path",
                    "config/mqtt_config.yaml",
                ),
                (
                    &cfg.unused_locally[1],
                    "s3_config_path",
                    "config/s3_config.yaml",
                ),
            ] {
                let at = format!(
                    "{}:{}: comm_args.{key} is ignored for a local run",
                    path.display(),
                    line_of(key)
                );
                assert!(w.starts_with(&at), "{name}: expected {at}: {w}");
                assert!(w.contains(file) && w.contains("(not found)"), "{name}: {w}");
            }
        } else {
            assert!(
                cfg.unused_locally.is_empty(),
                "{name}: {:#?}",
                cfg.unused_locally
            );
        }
        assert_eq!(
            cfg.warnings().count(),
            cfg.ignored_keys.len() + cfg.unused_locally.len(),
            "{name}"
        );
        // The (placeholder) wandb key is a secret.
        let shown = cfg.to_yaml_masked();
        assert!(!shown.contains("your-wandb-api-key"), "{name}: {shown}");
        assert!(shown.contains(MASK), "{name}");
        // A distributed load reads the broker and store files: without them, an error naming
        // the key; the others load as they are.
        match Config::load(path) {
            Ok(_) => assert!(!named, "{name} loaded without its broker file"),
            Err(e) => {
                assert!(named, "{name}: {e}");
                assert!(
                    matches!(
                        e,
                        ConfigError::Referenced {
                            key: "comm_args.mqtt_config_path",
                            ..
                        }
                    ),
                    "{name}: {e}"
                );
            }
        }
    }
}

/// FedML's step-by-step example with the broker and store files FedML ships (in its TRPC example,
/// pointing at FedML's public broker) placed where the example expects them: a distributed load
/// reads them (and masks the password), a local run still uses its embedded broker.
#[test]
fn fedml_example_with_fedml_companion_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    let main = dir.path().join("fedml_config.yaml");
    std::fs::copy(
        fedml_dir().join("mqtt_s3_fedavg_mnist_lr_step_by_step.yaml"),
        &main,
    )
    .unwrap();
    for f in COMPANIONS {
        std::fs::copy(
            fedml_dir().join("trpc_companion").join(f),
            dir.path().join("config").join(f),
        )
        .unwrap();
    }
    let cfg = Config::load(&main).unwrap();
    let m = &cfg.comm_args.customized_training_mqtt_config;
    assert_eq!(
        (m.broker_host.as_str(), m.broker_port, m.mqtt_user.as_str()),
        ("mqtt.fedml.ai", 1883, "admin")
    );
    assert_eq!(
        cfg.comm_args.customized_training_s3_config.cn_region_name,
        "us-west-1"
    );
    let shown = cfg.to_yaml_masked();
    assert!(!shown.contains("your-mqtt-password"), "{shown}");

    let cfg = Config::load_for(&main, LoadMode::Local).unwrap();
    let m = &cfg.comm_args.customized_training_mqtt_config;
    assert_eq!((m.broker_host.as_str(), m.broker_port), ("127.0.0.1", 0));
    assert_eq!(cfg.unused_locally.len(), 2);
    assert!(
        cfg.unused_locally
            .iter()
            .all(|w| !w.contains("(not found)")),
        "{:#?}",
        cfg.unused_locally
    );
}

fn fedmq_config_check_args(args: &[&str], path: &Path) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fedmq"));
    cmd.args(["config", "check"]).args(args).arg(path);
    for (k, _) in fedmq::config::ENV_OVERRIDES {
        cmd.env_remove(k);
    }
    cmd.env_remove("RUST_LOG");
    cmd.output().expect("running fedmq")
}

/// `fedmq config check --local` accepts FedML's step-by-step example as `fedmq run` would (one
/// warning per unread file, the wandb key masked); without `--local`, the missing broker file is
/// an error naming the key.
#[test]
fn config_check_local_flag() {
    let path = fedml_dir().join("mqtt_s3_fedavg_mnist_lr_step_by_step.yaml");
    let out = fedmq_config_check_args(&["--local"], &path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stderr}", out.status);
    for key in ["comm_args.mqtt_config_path", "comm_args.s3_config_path"] {
        let n = stderr
            .lines()
            .filter(|l| {
                l.starts_with("warning: ")
                    && l.contains(&format!("{key} is ignored for a local run"))
            })
            .count();
        assert_eq!(n, 1, "{key}: {stderr}");
    }
    assert!(stderr.contains("ok (for a local run)"), "{stderr}");
    assert!(
        stdout.contains("wandb_key:") && !stdout.contains("your-wandb-api-key"),
        "{stdout}"
    );

    let out = fedmq_config_check_args(&[], &path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("comm_args.mqtt_config_path") && stderr.contains("config/mqtt_config.yaml"),
        "{stderr}"
    );
}
