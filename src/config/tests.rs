use super::*;

fn parse(text: &str) -> Result<Config> {
    Config::from_yaml_str(text, Path::new("fedml_config.yaml"))
}

#[test]
fn typo_points_at_line_and_suggests_key() {
    let text = "common_args:\n  random_seed: 1\ntrain_args:\n  epochs: 2\n  bach_size: 4\n";
    let err = parse(text).unwrap_err();
    match &err {
        ConfigError::UnknownKey(k) => {
            let UnknownKey {
                line,
                section,
                key,
                suggestion,
                ..
            } = &**k;
            assert_eq!(*line, 5);
            assert_eq!(section, "train_args");
            assert_eq!(key, "bach_size");
            assert_eq!(suggestion.as_deref(), Some("batch_size"));
        }
        other => panic!("expected UnknownKey, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.starts_with("fedml_config.yaml:5:3: unknown key `bach_size`"),
        "{msg}"
    );
    assert!(msg.contains("did you mean `batch_size`?"), "{msg}");
}

#[test]
fn misplaced_key_names_its_section() {
    let text = "data_args:\n  dataset: mnist\n  epochs: 3\n";
    let msg = parse(text).unwrap_err().to_string();
    assert!(
        msg.contains(":3:3: unknown key `epochs` in section `data_args`"),
        "{msg}"
    );
    assert!(msg.contains("belongs in section `train_args`"), "{msg}");
}

#[test]
fn nested_upper_case_keys_are_checked() {
    let text = "comm_args:\n  customized_training_s3_config:\n    CN_S3_ENDPIONT: http://x\n";
    let msg = parse(text).unwrap_err().to_string();
    assert!(
        msg.contains("in section `comm_args.customized_training_s3_config`"),
        "{msg}"
    );
    assert!(msg.contains("did you mean `CN_S3_ENDPOINT`?"), "{msg}");
}

#[test]
fn unknown_section_is_rejected() {
    let msg = parse("train_arg:\n  epochs: 1\n").unwrap_err().to_string();
    assert!(
        msg.contains("unknown key `train_arg` at the top level"),
        "{msg}"
    );
    assert!(msg.contains("did you mean `train_args`?"), "{msg}");
}

#[test]
fn far_off_key_lists_valid_keys() {
    let msg = parse("validation_args:\n  zzzzzzzzzz: 1\n")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("valid keys here: frequency_of_the_test"),
        "{msg}"
    );
}

#[test]
fn wrong_type_names_line() {
    let err = parse("train_args:\n  epochs: two\n").unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, ConfigError::Parse { line: Some(2), .. }),
        "{msg}"
    );
    assert!(msg.starts_with("fedml_config.yaml:2:"), "{msg}");
    assert!(msg.contains("train_args.epochs"), "{msg}");
}

#[test]
fn empty_file_gives_defaults() {
    assert_eq!(parse("").unwrap(), Config::default());
    assert_eq!(parse("# nothing\n").unwrap(), Config::default());
}

#[test]
fn fedml_style_file_loads() {
    let text = r#"
common_args:
  training_type: "cross_silo"
  random_seed: 0
  using_mlops: false
  config_version: release
environment_args:
  bootstrap: config/bootstrap.sh
data_args:
  dataset: "mnist"
  data_cache_dir: ~/fedml_data
  partition_method: "hetero"
  partition_alpha: 0.5
model_args:
  model: "lr"
  model_file_cache_folder: "./model_file_cache"
  global_model_file_path: "./model_file_cache/global_model.pt"
train_args:
  federated_optimizer: "FedAvg"
  client_id_list: "[]"
  client_num_in_total: 1000
  client_num_per_round: 2
  comm_round: 50
  epochs: 1
  batch_size: 10
  client_optimizer: sgd
  learning_rate: 0.03
  weight_decay: 0.001
validation_args:
  frequency_of_the_test: 5
device_args:
  worker_num: 2
  using_gpu: false
  gpu_mapping_file: config/gpu_mapping.yaml
  gpu_mapping_key: mapping_default
comm_args:
  backend: "MQTT_S3"
  mqtt_config_path: config/mqtt_config.yaml
  s3_config_path: config/s3_config.yaml
  customized_training_mqtt_config:
    BROKER_HOST: mqtt.example.org
    BROKER_PORT: 1883
    MQTT_USER: admin
    MQTT_PWD: secret
    MQTT_KEEPALIVE: 180
  customized_training_s3_config:
    BUCKET_NAME: fedml
    CN_S3_AKI: AKI
    CN_S3_SAK: SAK
    CN_REGION_NAME: us-east-1
    CN_S3_ENDPOINT: http://minio:9000
tracking_args:
  log_file_dir: ./log
  enable_wandb: false
lsa_args:
  prime_number: 2147483647
  precision_parameter: 10
  privacy_guarantee: 2
"#;
    let cfg = parse(text).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.train_args.client_num_in_total, 1000);
    assert_eq!(
        cfg.comm_args.customized_training_mqtt_config.broker_port,
        1883
    );
    assert_eq!(
        cfg.comm_args.customized_training_s3_config.cn_s3_endpoint,
        "http://minio:9000"
    );
    assert_eq!(cfg.lsa_args.prime_number, 2147483647);
    let masked = cfg.to_yaml_masked();
    assert!(
        !masked.contains("SAK\n") && !masked.contains("secret"),
        "{masked}"
    );
}

#[test]
fn validate_reports_every_problem() {
    let mut cfg = Config::default();
    cfg.train_args.client_num_per_round = 50;
    cfg.model_args.model = "resnet".into();
    cfg.data_args.partition_alpha = 0.0;
    let msg = cfg.validate().unwrap_err().to_string();
    assert!(msg.contains("train_args.client_num_per_round"), "{msg}");
    assert!(msg.contains("model_args.model: "), "{msg}");
    assert!(msg.contains("resnet"), "{msg}");
    assert!(msg.contains("data_args.partition_alpha"), "{msg}");
}

#[test]
fn env_overrides_secrets() {
    let mut cfg = Config::default();
    cfg.apply_env_from(|k| match k {
        "FEDMQ_S3_SAK" => Some("from-env".into()),
        "FEDMQ_MQTT_PWD" => Some(String::new()),
        _ => None,
    });
    assert_eq!(
        cfg.comm_args.customized_training_s3_config.cn_s3_sak,
        "from-env"
    );
    assert_eq!(cfg.comm_args.customized_training_mqtt_config.mqtt_pwd, "");
    assert_eq!(ENV_OVERRIDES.len(), 7);
    cfg.apply_env_from(|k| (k == "FEDMQ_HEALTH_LISTEN").then(|| "0.0.0.0:9464".into()));
    assert_eq!(cfg.fedmq_args.health_listen, "0.0.0.0:9464");
}

#[test]
fn shipped_configs_are_valid() {
    for f in [
        "config/fedml_config.yaml",
        "config/fedml_config_minio.yaml",
        "config/fashion_mnist.yaml",
        "config/shakespeare.yaml",
        "config/movielens.yaml",
        "config/hierarchical.yaml",
    ] {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
        Config::load(&p).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    // The scenario configs name the data set, model and partition the scenario is about.
    let load = |f: &str| Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join(f)).unwrap();
    for (f, dataset, model) in [
        ("config/fashion_mnist.yaml", "fashion_mnist", "cnn"),
        ("config/shakespeare.yaml", "shakespeare", "rnn"),
        ("config/movielens.yaml", "movielens_100k", "mf"),
    ] {
        let c = load(f);
        assert_eq!(
            (c.data_args.dataset.as_str(), c.model_args.model.as_str()),
            (dataset, model),
            "{f}"
        );
    }
    assert_eq!(
        load("config/movielens.yaml").data_args.partition_method,
        "natural"
    );
    let h = load("config/hierarchical.yaml");
    assert!(h.hierarchical());
    assert!(h.train_args.group_num >= 10 && h.train_args.client_num_in_total >= 50);
}

mod tls {
    use super::*;

    fn with_certs() -> (tempfile::TempDir, String, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let plan = crate::crypto::tls::CertsPlan::new(dir.path(), vec!["client-1".into()]);
        crate::crypto::tls::generate_certs(&plan).unwrap();
        let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
        let (ca, cert, key) = (p("ca.pem"), p("client-1.pem"), p("client-1.key"));
        (dir, ca, cert, key)
    }

    fn problems(cfg: &Config) -> Vec<String> {
        match cfg.validate() {
            Ok(()) => Vec::new(),
            Err(ConfigError::Invalid { problems }) => problems,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn keys_parse_with_their_fedml_style_names() {
        let text = "comm_args:\n  customized_training_mqtt_config:\n    MQTT_TLS: true\n    \
                    MQTT_CA_PATH: /c/ca.pem\n    MQTT_CERT_PATH: /c/x.pem\n    \
                    MQTT_KEY_PATH: /c/x.key\n  customized_training_s3_config:\n    \
                    CN_S3_ENDPOINT: https://s3:9000\n    CN_S3_CA_PATH: /c/ca.pem\n";
        let cfg = parse(text).unwrap();
        let m = &cfg.comm_args.customized_training_mqtt_config;
        assert!(m.mqtt_tls);
        assert_eq!(m.mqtt_ca_path, "/c/ca.pem");
        assert_eq!(m.mqtt_cert_path, "/c/x.pem");
        assert_eq!(m.mqtt_key_path, "/c/x.key");
        let s = &cfg.comm_args.customized_training_s3_config;
        assert_eq!(s.cn_s3_ca_path, "/c/ca.pem");
        // Defaults: TLS off, nothing set, and valid.
        let d = Config::default();
        assert!(!d.comm_args.customized_training_mqtt_config.mqtt_tls);
        d.validate().unwrap();
        // A typo is caught like any other key.
        let msg = parse("comm_args:\n  customized_training_mqtt_config:\n    MQTT_CA_PAHT: x\n")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("did you mean `MQTT_CA_PATH`?"), "{msg}");
    }

    #[test]
    fn valid_tls_settings_pass() {
        let (_dir, ca, cert, key) = with_certs();
        let mut cfg = Config::default();
        let m = &mut cfg.comm_args.customized_training_mqtt_config;
        m.mqtt_tls = true;
        m.broker_port = 8883;
        m.mqtt_ca_path = ca.clone();
        m.mqtt_cert_path = cert;
        m.mqtt_key_path = key;
        let s = &mut cfg.comm_args.customized_training_s3_config;
        s.cn_s3_endpoint = "https://127.0.0.1:9000".into();
        s.cn_s3_ca_path = ca;
        cfg.validate().unwrap();
    }

    #[test]
    fn missing_or_wrong_files_name_key_and_path() {
        let (dir, ca, cert, key) = with_certs();
        let mut cfg = Config::default();
        let m = &mut cfg.comm_args.customized_training_mqtt_config;
        m.mqtt_tls = true;
        m.broker_port = 8883;
        m.mqtt_ca_path = dir.path().join("nope.pem").to_string_lossy().into_owned();
        // A key where the certificate should be, and the reverse.
        m.mqtt_cert_path = key;
        m.mqtt_key_path = ca;
        let p = problems(&cfg);
        assert_eq!(p.len(), 3, "{p:#?}");
        assert!(
            p[0].starts_with("comm_args.customized_training_mqtt_config.MQTT_CA_PATH: cannot read")
                && p[0].contains("nope.pem"),
            "{}",
            p[0]
        );
        assert!(
            p[1].contains("MQTT_CERT_PATH") && p[1].contains("no PEM certificate"),
            "{}",
            p[1]
        );
        assert!(
            p[2].contains("MQTT_KEY_PATH") && p[2].contains("no PEM private key"),
            "{}",
            p[2]
        );
        let _ = cert;
    }

    #[test]
    fn inconsistent_tls_settings_are_explained() {
        let (_dir, ca, cert, _key) = with_certs();
        // TLS on without a CA.
        let mut cfg = Config::default();
        cfg.comm_args.customized_training_mqtt_config.mqtt_tls = true;
        cfg.comm_args.customized_training_mqtt_config.broker_port = 8883;
        let p = problems(&cfg);
        assert!(
            p.len() == 1 && p[0].contains("MQTT_CA_PATH: MQTT_TLS is true but no CA"),
            "{p:#?}"
        );
        // TLS towards fedmq run's plain embedded broker.
        cfg.comm_args.customized_training_mqtt_config.broker_port = 0;
        let p = problems(&cfg);
        assert!(
            p.len() == 2 && p[0].contains("MQTT_TLS: true, but BROKER_PORT 0"),
            "{p:#?}"
        );
        cfg.comm_args.customized_training_mqtt_config.broker_port = 8883;
        // A certificate without its key.
        let m = &mut cfg.comm_args.customized_training_mqtt_config;
        m.mqtt_ca_path = ca.clone();
        m.mqtt_cert_path = cert.clone();
        let p = problems(&cfg);
        assert!(
            p.len() == 1 && p[0].contains("MQTT_KEY_PATH: MQTT_CERT_PATH is set"),
            "{p:#?}"
        );
        // TLS paths with TLS off: plain text would be a surprise.
        let mut cfg = Config::default();
        cfg.comm_args.customized_training_mqtt_config.mqtt_ca_path = ca.clone();
        let p = problems(&cfg);
        assert!(
            p.len() == 1 && p[0].contains("MQTT_CA_PATH: set, but MQTT_TLS is false"),
            "{p:#?}"
        );
        // An S3 CA for a plain-HTTP (or embedded) endpoint.
        let mut cfg = Config::default();
        let s = &mut cfg.comm_args.customized_training_s3_config;
        s.cn_s3_ca_path = ca;
        s.cn_s3_endpoint = "http://127.0.0.1:9000".into();
        let p = problems(&cfg);
        assert!(
            p.len() == 1
                && p[0].starts_with("comm_args.customized_training_s3_config.CN_S3_CA_PATH:")
                && p[0].contains("not an https:// URL"),
            "{p:#?}"
        );
        // Missing S3 CA file.
        cfg.comm_args.customized_training_s3_config.cn_s3_endpoint = "https://h:1".into();
        cfg.comm_args.customized_training_s3_config.cn_s3_ca_path = "/nonexistent/ca.pem".into();
        let p = problems(&cfg);
        assert!(
            p.len() == 1
                && p[0].contains("CN_S3_CA_PATH: cannot read CA certificate /nonexistent/ca.pem"),
            "{p:#?}"
        );
    }
}

/// FedML's separate `mqtt_config.yaml` / `s3_config.yaml` are read: found beside the config (or
/// in the working directory), inline keys win over them, a missing file and a typo in one are
/// errors that name the file.
#[test]
fn mqtt_and_s3_config_paths_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("config")).unwrap();
    std::fs::write(
        d.join("config/mqtt_config.yaml"),
        "BROKER_HOST: 'broker.example.org'\nBROKER_PORT: 1884\nMQTT_USER: \"admin\"\nMQTT_PWD: \"pw\"\n",
    )
    .unwrap();
    let s3 = d.join("s3_config.yaml");
    std::fs::write(
        &s3,
        "BUCKET_NAME: fedml\nCN_S3_AKI:\nCN_S3_SAK:\nCN_REGION_NAME: us-west-1\n",
    )
    .unwrap();
    let main = d.join("fedml_config.yaml");
    let write = |inline: &str, mqtt: &str| {
        std::fs::write(
            &main,
            format!(
                "comm_args:\n  backend: MQTT_S3\n  mqtt_config_path: {mqtt}\n  s3_config_path: {}\n{inline}",
                s3.display()
            ),
        )
        .unwrap();
    };
    // Relative to the config file's directory (the working directory has no `config/`).
    write("", "config/mqtt_config.yaml");
    let cfg = Config::load(&main).unwrap();
    let m = &cfg.comm_args.customized_training_mqtt_config;
    assert_eq!(
        (m.broker_host.as_str(), m.broker_port),
        ("broker.example.org", 1884)
    );
    assert_eq!((m.mqtt_user.as_str(), m.mqtt_pwd.as_str()), ("admin", "pw"));
    let s = &cfg.comm_args.customized_training_s3_config;
    assert_eq!(
        (s.bucket_name.as_str(), s.cn_region_name.as_str()),
        ("fedml", "us-west-1")
    );

    // An inline key wins over the file's.
    write(
        "  customized_training_mqtt_config:\n    BROKER_PORT: 1999\n",
        "config/mqtt_config.yaml",
    );
    let cfg = Config::load(&main).unwrap();
    let m = &cfg.comm_args.customized_training_mqtt_config;
    assert_eq!(
        (m.broker_host.as_str(), m.broker_port),
        ("broker.example.org", 1999)
    );

    // A missing file names the key and the file.
    write("", "config/nope.yaml");
    let e = Config::load(&main).unwrap_err().to_string();
    assert!(
        e.contains("comm_args.mqtt_config_path") && e.contains("nope.yaml"),
        "{e}"
    );

    // A typo inside the separate file is reported with that file and its line.
    std::fs::write(
        d.join("config/mqtt_config.yaml"),
        "BROKER_HOST: h\nBROKER_PROT: 1\n",
    )
    .unwrap();
    write("", "config/mqtt_config.yaml");
    let e = Config::load(&main).unwrap_err().to_string();
    assert!(
        e.contains("mqtt_config.yaml") && e.contains("BROKER_PROT"),
        "{e}"
    );
    assert!(e.contains(":2"), "line of the typo: {e}");
}

/// A config written the way FedML's examples are (cross-silo MQTT_S3, with tracking, attack,
/// defense and DP sections switched off) loads: each FedML key fedmq does not use is one warning
/// naming its line and why; a typo is still an error; a switched-on feature fedmq lacks is an
/// error that says so.
#[test]
fn fedml_example_keys_load_with_warnings_and_typos_still_fail() {
    let text = r#"common_args:
  training_type: "cross_silo"
  scenario: "horizontal"
  using_mlops: false
  config_version: release
  random_seed: 0
data_args:
  dataset: "mnist"
  data_cache_dir: ~/fedml_data
  partition_method: "hetero"
  partition_alpha: 0.5
  debug: false
model_args:
  model: "lr"
  class_num: 10
train_args:
  federated_optimizer: "FedAvg"
  client_id_list:
  client_num_in_total: 2
  client_num_per_round: 2
  comm_round: 3
  epochs: 1
  batch_size: 10
  client_optimizer: sgd
  learning_rate: 0.03
  weight_decay: 0.001
  ml_engine: torch
validation_args:
  frequency_of_the_test: 1
device_args:
  worker_num: 2
  using_gpu: false
  gpu_mapping_file: config/gpu_mapping.yaml
  gpu_mapping_key: mapping_default
comm_args:
  backend: "MQTT_S3"
  is_mobile: 0
  grpc_ipconfig_path: config/grpc_ipconfig.csv
tracking_args:
  log_file_dir: ./log
  enable_wandb: false
  wandb_name: fedml_torch_fedavg_mnist_lr
attack_args:
  enable_attack: false
  attack_type: byzantine
  byzantine_client_num: 1
defense_args:
  enable_defense: false
  defense_type: krum
  krum_param_m: 2
dp_args:
  enable_dp: false
  epsilon: 1.0
"#;
    let cfg = parse(text).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.train_args.client_num_in_total, 2);
    let w = &cfg.ignored_keys;
    for (line, key) in [
        (12, "data_args.debug"),
        (15, "model_args.class_num"),
        (27, "train_args.ml_engine"),
        (37, "comm_args.is_mobile"),
        (38, "comm_args.grpc_ipconfig_path"),
        (42, "tracking_args.wandb_name"),
    ] {
        assert!(
            w.iter()
                .any(|l| l.contains(&format!(":{line}: {key} is a FedML key"))),
            "{key} at line {line}: {w:#?}"
        );
    }
    // One line each, and nothing fedmq reads among them (keys fedmq already accepts, such as
    // common_args.scenario or device_args.worker_num, give no warning).
    assert_eq!(w.len(), 6, "{w:#?}");
    assert!(!w.iter().any(|l| l.contains(" train_args.learning_rate is")
        || l.contains(" tracking_args.log_file_dir is")));

    // A typo is still caught, with its line, after FedML keys above it were left out.
    let typo = text.replace("  learning_rate: 0.03", "  learnig_rate: 0.03");
    let e = parse(&typo).unwrap_err().to_string();
    assert!(e.contains("learnig_rate") && e.contains(":25"), "{e}");
    assert!(e.contains("learning_rate"), "suggests the right key: {e}");
    // An unknown section that is no FedML section is an error too.
    let e = parse(&format!("{text}trian_args:\n  epochs: 2\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("trian_args"), "{e}");
    // The attack, defense and DP sections are fedmq's own now: switched on, they are read.
    let on = parse(
        &text
            .replace("enable_dp: false", "enable_dp: true")
            .replace("enable_defense: false", "enable_defense: true"),
    )
    .unwrap();
    assert!(on.dp_args.enable_dp && on.defense_args.enable_defense);
    assert_eq!(on.dp_args.epsilon, Some(1.0));
    assert_eq!(on.defense_args.krum_param_m, Some(2));
    // A FedML feature switched on that fedmq lacks is an error naming it.
    let e = parse(&format!("{text}fhe_args:\n  enable_fhe: true\n"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fhe_args.enable_fhe") && e.contains("homomorphic encryption"),
        "{e}"
    );
}

/// A main config `fedml_config.yaml` in a fresh directory, naming `config/mqtt_config.yaml`
/// and `config/s3_config.yaml` (which are not written) below `extra` lines of comm_args.
fn with_companions(extra: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let main = dir.path().join("fedml_config.yaml");
    std::fs::write(
        &main,
        format!(
            "data_args:\n  dataset: mnist\n  data_cache_dir: ~/.cache/fedml_data\ncomm_args:\n  \
             backend: MQTT_S3\n  mqtt_config_path: config/mqtt_config.yaml\n  \
             s3_config_path: config/s3_config.yaml\n{extra}"
        ),
    )
    .unwrap();
    (dir, main)
}

/// `~` in path keys is the home directory, in the main file and in the broker file it names.
#[test]
fn tilde_paths_are_expanded_on_load() {
    let home = dirs::home_dir().expect("a home directory");
    let (dir, main) = with_companions("");
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::write(dir.path().join("config/s3_config.yaml"), "BUCKET_NAME: b\n").unwrap();
    std::fs::write(
        dir.path().join("config/mqtt_config.yaml"),
        "BROKER_HOST: h\nBROKER_PORT: 8883\nMQTT_TLS: true\n\
         MQTT_CA_PATH: ~/fedmq-no-such-dir/ca.pem\n",
    )
    .unwrap();
    let e = Config::load(&main).unwrap_err().to_string();
    let ca = home.join("fedmq-no-such-dir/ca.pem");
    assert!(
        e.contains("MQTT_CA_PATH: cannot read") && e.contains(&ca.display().to_string()),
        "{e}"
    );
    let cfg = Config::load_for(&main, LoadMode::Local).unwrap();
    assert_eq!(
        Path::new(&cfg.data_args.data_cache_dir),
        home.join(".cache/fedml_data")
    );
    assert_eq!(cfg.data_cache_dir(), home.join(".cache/fedml_data"));
    assert!(path_keys().contains(&"data_args.data_cache_dir"));
}

/// A local run does not read FedML's broker and store files: one warning each, with the key,
/// its line and why, also when the files are missing; a distributed load needs them.
#[test]
fn local_load_leaves_companion_files_unread_with_a_warning_each() {
    let (dir, main) =
        with_companions("  customized_training_s3_config:\n    BUCKET_NAME: inline-bucket\n");
    // Distributed: the missing file is an error naming the key.
    let e = Config::load(&main).unwrap_err();
    assert!(matches!(
        e,
        ConfigError::Referenced {
            key: "comm_args.mqtt_config_path",
            ..
        }
    ));
    // Local: loads; the files are neither needed nor read.
    let cfg = Config::load_for(&main, LoadMode::Local).unwrap();
    let w = &cfg.unused_locally;
    assert_eq!(w.len(), 2, "{w:#?}");
    let at = format!("{}:", main.display());
    assert!(
        w[0].starts_with(&format!(
            "{at}6: comm_args.mqtt_config_path is ignored for a local run"
        )) && w[0].contains("config/mqtt_config.yaml")
            && w[0].contains("(not found)")
            && w[0].contains("fedmq server"),
        "{}",
        w[0]
    );
    assert!(
        w[1].starts_with(&format!(
            "{at}7: comm_args.s3_config_path is ignored for a local run"
        )),
        "{}",
        w[1]
    );
    assert_eq!(cfg.warnings().count(), 2);
    // The broker stays fedmq run's embedded one; inline keys are still read.
    let m = &cfg.comm_args.customized_training_mqtt_config;
    assert_eq!((m.broker_host.as_str(), m.broker_port), ("127.0.0.1", 0));
    assert_eq!(
        cfg.comm_args.customized_training_s3_config.bucket_name,
        "inline-bucket"
    );
    assert_eq!(cfg.comm_args.mqtt_config_path, None);

    // With the files present (FedML's public broker in them), a local run still does not read
    // them, and does not say they are missing; a distributed load reads them.
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::write(
        dir.path().join("config/mqtt_config.yaml"),
        "BROKER_HOST: 'mqtt.fedml.ai'\nBROKER_PORT: 1883\nMQTT_USER: \"admin\"\nMQTT_PWD: \"pw\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("config/s3_config.yaml"),
        "BUCKET_NAME: fedml\n",
    )
    .unwrap();
    let cfg = Config::load_for(&main, LoadMode::Local).unwrap();
    assert_eq!(cfg.unused_locally.len(), 2);
    assert!(!cfg.unused_locally[0].contains("(not found)"));
    let m = &cfg.comm_args.customized_training_mqtt_config;
    assert_eq!((m.broker_host.as_str(), m.broker_port), ("127.0.0.1", 0));
    let cfg = Config::load(&main).unwrap();
    assert!(cfg.unused_locally.is_empty());
    let m = &cfg.comm_args.customized_training_mqtt_config;
    assert_eq!(
        (m.broker_host.as_str(), m.broker_port),
        ("mqtt.fedml.ai", 1883)
    );
    // The broker file's password is masked in the printed configuration.
    let shown = cfg.to_yaml_masked();
    let pwd = shown.lines().find(|l| l.contains("MQTT_PWD:")).unwrap();
    assert!(pwd.contains(MASK) && !pwd.contains("pw"), "{shown}");
}

/// A typo in the broker or store file: that file's line, the closest key and the valid keys.
#[test]
fn companion_file_typo_lists_the_valid_keys() {
    let (dir, main) = with_companions("");
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::write(
        dir.path().join("config/mqtt_config.yaml"),
        "BROKER_HOST: h\n",
    )
    .unwrap();
    let s3 = dir.path().join("config/s3_config.yaml");
    std::fs::write(&s3, "BUCKET_NAME: b\nCN_REGON_NAME: us-east-1\n").unwrap();
    let e = Config::load(&main).unwrap_err();
    let ConfigError::UnknownKey(u) = &e else {
        panic!("{e:?}")
    };
    assert_eq!((u.line, u.key.as_str()), (2, "CN_REGON_NAME"));
    assert_eq!(u.section, "comm_args.customized_training_s3_config");
    assert_eq!(u.named_by.as_deref(), Some("comm_args.s3_config_path"));
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!(
            "{}:2:1: unknown key `CN_REGON_NAME`",
            s3.display()
        )),
        "{msg}"
    );
    assert!(msg.contains("did you mean `CN_REGION_NAME`?"), "{msg}");
    assert!(
        msg.contains("valid keys: BUCKET_NAME, CN_S3_AKI, CN_S3_SAK, CN_REGION_NAME"),
        "{msg}"
    );
    // Far from every key: the valid keys alone.
    std::fs::write(&s3, "zzzzzzzz: 1\n").unwrap();
    let msg = Config::load(&main).unwrap_err().to_string();
    assert!(
        msg.contains("valid keys here: BUCKET_NAME, CN_S3_AKI"),
        "{msg}"
    );
}

/// A misspelled FedML switch in a section fedmq skips whole is an error (it would leave the
/// feature off without a word); FedML's other `enable_*` keys there are not; a switch's value
/// is read as PyYAML reads it.
#[test]
fn misspelled_or_odd_fedml_switches_are_errors() {
    let text = "train_args:\n  epochs: 1\ndp_args:\n  epsilon: 0.5\n  enable_dpp: true\n";
    let e = parse(text).unwrap_err();
    let ConfigError::UnknownKey(u) = &e else {
        panic!("{e:?}")
    };
    assert_eq!((u.line, u.column), (5, 3));
    assert_eq!(u.suggestion.as_deref(), Some("enable_dp"));
    let msg = e.to_string();
    assert!(
        msg.starts_with("fedml_config.yaml:5:3: unknown key `enable_dpp` in section `dp_args`"),
        "{msg}"
    );
    for (section, key, switch) in [
        ("attack_args", "enable_atack", "enable_attack"),
        ("defense_args", "enable-defense", "enable_defense"),
        ("secure_aggregation_args", "Enable_SA", "enable_sa"),
        ("fhe_args", "enable_he", "enable_fhe"),
        ("dp_args", "enable_rdp_acountant", "enable_rdp_accountant"),
    ] {
        let msg = parse(&format!("{section}:\n  {key}: false\n"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains(&format!("unknown key `{key}` in section `{section}`"))
                && msg.contains(&format!("did you mean `{switch}`?")),
            "{msg}"
        );
    }
    // FedML's own keys of those sections load; those fedmq does not use warn, one each.
    let cfg = parse(
        "dp_args:\n  enable_dp: false\n  enable_rdp_accountant: False\n  dp_solution_type: cdp\n  \
         epsilon: 0.5\n  delta: 0.1\n  accountant_type: rdp\nattack_args:\n  enable_attack: false\n  \
         attack_type: byzantine\n  backdoor_type: pattern\n",
    )
    .unwrap();
    assert_eq!(cfg.ignored_keys.len(), 2, "{:#?}", cfg.ignored_keys);
    assert_eq!(cfg.dp_args.delta, 0.1);
    // PyYAML reads `yes` and `on` as true: the feature is asked for.
    for on in ["yes", "On", "1", "True"] {
        let msg = parse(&format!("fhe_args:\n  enable_fhe: {on}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("fhe_args.enable_fhe asks for homomorphic encryption"),
            "{on}: {msg}"
        );
    }
    let msg = parse("fhe_args:\n  enable_fhe: maybe\n")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("fhe_args.enable_fhe: expected true or false, got maybe"),
        "{msg}"
    );
    // A misspelled FedML section is suggested too.
    let msg = parse("dp_arg:\n  enable_dp: true\n")
        .unwrap_err()
        .to_string();
    assert!(msg.contains("did you mean `dp_args`?"), "{msg}");
}

/// FedML's asynchronous-training keys are read under FedBuff's names, one warning each; a
/// contradiction is an error saying what to set.
#[test]
fn fedml_async_keys_map_onto_fedbuff() {
    let text = "train_args:\n  federated_optimizer: Async_FedAvg\n  is_async: true\n  \
                buffer_size: 5\n  max_acceptable_staleness: 3\n  client_num_in_total: 10\n  \
                client_num_per_round: 10\n";
    let cfg = parse(text).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.fedmq_args.buffer_size, Some(5));
    assert_eq!(cfg.fedmq_args.max_staleness, 3);
    assert!(cfg.ignored_keys.is_empty(), "{:#?}", cfg.ignored_keys);
    let w = &cfg.mapped_keys;
    assert_eq!(w.len(), 3, "{w:#?}");
    assert!(w[0].starts_with("fedml_config.yaml:3: train_args.is_async is FedML's switch"));
    assert!(
        w[1].starts_with(
            "fedml_config.yaml:4: train_args.buffer_size is FedML's name for \
                          fedmq_args.buffer_size: read as fedmq_args.buffer_size: 5"
        ),
        "{}",
        w[1]
    );
    assert!(
        w[2].starts_with(
            "fedml_config.yaml:5: train_args.max_acceptable_staleness is FedML's \
                          name for fedmq_args.max_staleness: read as fedmq_args.max_staleness: 3"
        ),
        "{}",
        w[2]
    );

    // is_async with a synchronous optimizer: set federated_optimizer: FedBuff.
    let e = parse(&text.replace("Async_FedAvg", "FedAvg")).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, ConfigError::Invalid { .. }), "{msg}");
    assert!(
        msg.contains("train_args.is_async: true") && msg.contains("`federated_optimizer: FedBuff`"),
        "{msg}"
    );
    let msg = parse(&text.replace("is_async: true", "is_async: false"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("train_args.is_async: false, but federated_optimizer"),
        "{msg}"
    );
    // fedmq's own keys win only when they agree.
    let both = format!("{text}fedmq_args:\n  buffer_size: 4\n  max_staleness: 3\n");
    let msg = parse(&both).unwrap_err().to_string();
    assert!(
        msg.contains(
            "train_args.buffer_size: 5 (FedML's name) disagrees with fedmq_args.buffer_size: 4"
        ) && !msg.contains("max_acceptable_staleness"),
        "{msg}"
    );
    let cfg = parse(&both.replace("buffer_size: 4", "buffer_size: 5")).unwrap();
    assert!(cfg.mapped_keys[1].contains("which is set to the same value"));
    // FedML's 0 leaves the buffer at fedmq's default; with FedAvg the keys are noted as unused.
    let cfg = parse(
        "train_args:\n  federated_optimizer: FedAvg\n  is_async: false\n  buffer_size: 0\n  \
         max_acceptable_staleness: 0\n",
    )
    .unwrap();
    assert_eq!(cfg.fedmq_args.buffer_size, None);
    assert_eq!(cfg.fedmq_args.max_staleness, 0);
    assert!(cfg.mapped_keys[1].contains("unset") && cfg.mapped_keys[1].contains("FedBuff only"));
    let msg = parse("train_args:\n  buffer_size: -1\n")
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("train_args.buffer_size: expected a whole number"),
        "{msg}"
    );
}

/// Every secret is masked in the printed configuration, whatever its source; nothing else is.
#[test]
fn every_secret_is_masked() {
    let mut cfg = Config::default();
    assert!(
        !cfg.to_yaml_masked().contains(MASK),
        "nothing set, nothing masked"
    );
    let mut values = Vec::new();
    for (i, (key, slot)) in secrets(&mut cfg).into_iter().enumerate() {
        *slot = format!("secret-{i}-{key}");
        values.push(slot.clone());
    }
    // wandb_key is unset by default: secrets() skips it until it is set.
    cfg.tracking_args.wandb_key = Some("secret-wandb".into());
    values.push("secret-wandb".into());
    assert_eq!(secrets(&mut cfg).len(), SECRET_KEYS.len());
    cfg.apply_env_from(|k| (k == "FEDMQ_S3_SAK").then(|| "secret-from-env".into()));
    values.push("secret-from-env".into());
    let shown = cfg.to_yaml_masked();
    for v in &values {
        assert!(!shown.contains(v.as_str()), "{v} shown:\n{shown}");
    }
    assert_eq!(shown.matches(MASK).count(), SECRET_KEYS.len(), "{shown}");
    // The user name and access key id are not secret.
    assert!(shown.contains("CN_S3_AKI: fedmq"), "{shown}");
}

/// Defenses, attacks and privacy that cannot work are errors naming the key, all at once.
#[test]
fn impossible_defense_and_privacy_settings_are_errors() {
    let problems = |extra: &str| -> String {
        parse(&format!(
            "train_args:\n  client_num_in_total: 10\n  client_num_per_round: 6\n{extra}"
        ))
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string()
    };
    // A robust aggregator cannot see individual updates under secure aggregation.
    let e = problems(
        "secure_aggregation_args:\n  enable_sa: true\ndefense_args:\n  enable_defense: true\n  \
         defense_type: median\n",
    );
    assert!(
        e.contains("defense_args.enable_defense") && e.contains("secure aggregation"),
        "{e}"
    );
    // Krum needs n > 2f + 2.
    let e = problems(
        "defense_args:\n  enable_defense: true\n  defense_type: krum\n  byzantine_client_num: 2\n",
    );
    assert!(
        e.contains("defense_args.byzantine_client_num") && e.contains("≥ 7"),
        "{e}"
    );
    // A negative budget.
    let e = problems("dp_args:\n  enable_dp: true\n  epsilon: -3\n");
    assert!(
        e.contains("dp_args.epsilon must be a positive number"),
        "{e}"
    );
    // FLTrust without a root data set.
    let e = problems("defense_args:\n  enable_defense: true\n  defense_type: fltrust\n");
    assert!(
        e.contains("defense_args.root_data_size") && e.contains("root data set"),
        "{e}"
    );
    // A defense and central DP both replace the mean.
    let e = problems(
        "defense_args:\n  enable_defense: true\n  defense_type: median\ndp_args:\n  \
         enable_dp: true\n  noise_multiplier: 1.0\n",
    );
    assert!(e.contains("both replace"), "{e}");
    // A defense cannot stand in for SCAFFOLD's aggregate.
    let e = parse(
        "train_args:\n  federated_optimizer: SCAFFOLD\n  client_optimizer: sgd\n\
         defense_args:\n  enable_defense: true\n  defense_type: median\n",
    )
    .unwrap()
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("SCAFFOLD"), "{e}");
    // An attack that names no attacker.
    let e = problems("attack_args:\n  enable_attack: true\n");
    assert!(e.contains("no client attacks"), "{e}");
}
