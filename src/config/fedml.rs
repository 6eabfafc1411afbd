//! FedML keys that fedmq does not use: recognized, reported once each, and left out, so that a
//! FedML user's `fedml_config.yaml` loads. A key that is neither fedmq's nor FedML's is still an
//! error (with file:line and the closest valid key), and a FedML switch that asks for something
//! fedmq cannot do yet (`enable_fhe: true`) is an error that says so; so is a misspelled
//! switch (`enable_dpp`) in a section fedmq otherwise skips whole, which would silently leave the
//! feature off. FedML's asynchronous-training keys of `train_args` (`is_async`, `buffer_size`,
//! `max_acceptable_staleness`) are read under fedmq's names (FedBuff's), one warning each.

use super::error::{closest, UnknownKey};
use super::Config;
use serde_yaml_ng::Value;
use std::path::Path;

/// Why a FedML key is ignored, by theme.
const TRACKING: &str = "experiment tracking services (wandb, MLOps) are not used: fedmq writes \
                        metrics.jsonl, metrics.csv and plot.svg to the output directory";
const BACKEND: &str = "fedmq's backend is MQTT_S3: settings of FedML's gRPC, TRPC, MPI, mobile \
                       and other backends do not apply";
const PLATFORM: &str = "FedML platform bookkeeping (project, run and MLOps names, scenario) has \
                        no role in fedmq";
const DEVICE: &str = "fedmq places training with device_args.using_gpu and gpu_id; FedML's \
                      multi-GPU mappings do not apply";
const DATA: &str = "fedmq's data sets (data_args.dataset) are fetched and partitioned by fedmq \
                    itself; this FedML data-loader setting does not apply";
const MODEL: &str = "fedmq builds its models (lr, mlp, cnn) from model_args.model and the data \
                     set's shape and classes; this FedML model setting does not apply";
const TRAIN: &str = "a FedML trainer setting fedmq's trainer does not have (fedmq trains with \
                     train_args.client_optimizer, learning_rate, momentum, weight_decay, epochs \
                     and batch_size)";
const VALIDATION: &str = "fedmq evaluates the global model on the server every \
                          validation_args.frequency_of_the_test rounds";
const FEDPROX: &str = "fedmq reads FedProx's proximal coefficient from train_args.fedprox_mu \
                       (with train_args.federated_optimizer: FedProx); set it there";
const ATTACK: &str = "a FedML attack setting fedmq's attacks do not use (see attack_args in the \
                      README: attack_type, attack_mode, byzantine_client_num, ...)";
const DEFENSE: &str = "a FedML defense setting fedmq's defenses do not use (see defense_args in \
                       the README)";
const DP: &str = "a FedML differential-privacy setting fedmq does not use (fedmq's RDP accountant \
                  covers cdp and ddp; see dp_args in the README)";
const NOT_YET: &str = "this FedML feature is not in fedmq yet; its settings are read and \
                       ignored while it is switched off";

/// `(section, keys, why)`: the FedML keys (from the configs of FedML's own repository) that fedmq
/// does not use; `*` stands for every key of a section fedmq does not have.
#[rustfmt::skip]
const IGNORED: &[(&str, &[&str], &str)] = &[
    ("common_args", &["name", "project", "exist_ok", "config_version", "scenario", "use_customized_hierarchical"], PLATFORM),
    ("common_args", &["using_mlops", "mlops_api_key", "mlops_project_name", "mlops_run_name"], TRACKING),
    ("environment_args", &["*"], PLATFORM),
    ("private_config_paths", &["*"], PLATFORM),
    ("task_args", &["*"], PLATFORM),
    ("contribution_args", &["*"], NOT_YET),
    ("tracking_args", &["enable_tracking", "local_log_output_path", "mlops_api_key", "mlops_project_name", "mlops_run_name", "using_mlops", "wandb_name", "wandb_only_server", "enable_wandb", "wandb_key", "wandb_entity", "wandb_project", "run_name"], TRACKING),
    ("tracking_args", &["simulation_schedule", "runtime_est_mode", "simulation_gpu_hetero", "gpu_hetero_ratio"], BACKEND),
    ("comm_args", &["grpc_ipconfig_path", "trpc_master_config_path", "is_mobile", "enable_cuda_rpc", "cuda_rpc_gpu_mapping", "customized_training_thetastore_config", "customized_training_web3_config"], BACKEND),
    ("device_args", &["worker_num", "gpu_mapping_file", "gpu_mapping_key", "multi_gpu_server", "device_type", "gpi_id", "gpu_util_parse", "process_id"], DEVICE),
    ("dist_training_args", &["*"], DEVICE),
    ("data_args", &["block_size", "client_dataset_path", "data_col_idx", "data_conf", "data_file_path", "data_map_file", "dataset_name", "dataset_path", "dataset_streaming", "debug", "download", "download_port", "ego_number", "eval_dataset_size", "filter_less", "global_model_file_path", "hop_number", "img_size", "mlm_probability", "model_file_cache_folder", "num_class", "num_loaders", "num_workers_tile", "overwrite_cache", "part_file", "partition_file_path", "preprocessed", "remove_big_tiff", "remove_long_seq", "remove_unused_columns", "reprocess_input_data", "response_template", "secret_path", "task", "test_dataset_size", "test_size", "tile_batch_size", "tile_from_scratch", "tokenize_on_the_fly", "train_size", "truncate_long_seq"], DATA),
    ("model_args", &["alpha", "backbone", "backbone_freezed", "backbone_pretrained", "class_num", "conf_thres", "deeplearning_backend", "do_lower_case", "dropout", "eps", "extract_feat", "formulation", "global_model_file_path", "graph_embedding_dim", "group_norm_channels", "hidden_size", "image_size", "input_dim", "input_size", "iou_thres", "load_pretrained", "lr_scheduler", "model_class", "model_file_cache_folder", "model_name_or_path", "model_type", "n_layers", "node_embedding_dim", "normalize_adjacency", "normalize_features", "num_heads", "output_dim", "outstride", "peft_type", "readout_hidden_dim", "single_cls", "skip_log_model_net", "sparse_adjacency", "sync_bn", "use_flash_attention", "weights", "yolo_cfg", "yolo_hyp", "yolo_verbose"], MODEL),
    ("train_args", &["alpha", "bf16", "cache_client_status", "checkpoint_interval", "ci", "clip_grad_norm", "compress_ratio", "compression", "dampening", "ddp_find_unused_parameters", "deepspeed", "epochs_client", "epochs_server", "eval_accumulation_steps", "eval_batch_size", "eval_steps", "evaluate_during_training", "evaluate_during_training_steps", "evaluation_strategy", "fa_task", "fp16", "freeze_layers", "gmf", "gradient_accumulation_steps", "gradient_checkpointing", "initialize_all_clients", "is_debug_mode", "local_max_steps", "local_num_train_epochs", "logging_steps", "logging_strategy", "loss_type", "lr", "lr_decay_rate", "lr_milestones", "lr_schedule", "lr_step_size", "max_grad_norm", "max_seq_length", "metric", "ml_engine", "model_dtype", "mu", "nesterov", "no_bn_wd", "optimizer", "output_dir", "per_device_eval_batch_size", "per_device_train_batch_size", "save_on_each_node", "save_steps", "save_strategy", "save_total_limit", "seed", "server_checkpoint_interval", "sleep_time_max", "sweep", "temperature", "test_batch_size", "train_batch_size", "warmup_steps", "wd", "whether_distill_on_the_server", "whether_training_on_client"], TRAIN),
    ("validation_args", &["is_aggregator_test", "save_frequency", "test_on_client_ranks", "test_on_clients"], VALIDATION),
    ("attack_args", &["attack_method", "backdoor_type", "attack_training_rounds", "poisoned_training_round", "edge_case_type", "attack_client_indexes", "attack_prob", "lazy_worker_num", "lr", "batch_size", "epochs", "dataset_name", "model_name"], ATTACK),
    ("defense_args", &["bucket_size", "batch_num", "alpha", "client_num_per_round", "use_memory", "pretraining_round_num", "lazy_worker_num", "to_keep_higher_norm", "score_function", "weighting", "lambda", "server_learning_rate", "robust_threshold", "option_type"], DEFENSE),
    ("dp_args", &["dp_noise_type", "accountant_type", "rdp_alpha", "ml_engine", "NbAFL", "is_centralized", "epochs"], DP),
    ("fhe_args", &["*"], NOT_YET),
    ("fednova_args", &["*"], NOT_YET),
    ("fedprox_args", &["*"], FEDPROX),
    ("feddyn_args", &["*"], NOT_YET),
];

/// Switches that ask for a FedML feature fedmq does not have yet: an error when true.
const UNSUPPORTED_SWITCHES: &[(&str, &str, &str)] =
    &[("fhe_args", "enable_fhe", "homomorphic encryption")];

/// Sections FedML's configs have and fedmq's does not.
pub(super) const SECTIONS: &[&str] = &[
    "environment_args",
    "private_config_paths",
    "task_args",
    "contribution_args",
    "fhe_args",
    "fednova_args",
    "fedprox_args",
    "feddyn_args",
    "dist_training_args",
];

/// Why FedML key `key` of `section` (`""` for a top-level section) is ignored, if it is one.
pub(super) fn why_ignored(section: &str, key: &str) -> Option<&'static str> {
    if section.is_empty() {
        return SECTIONS.contains(&key).then(|| {
            IGNORED
                .iter()
                .find(|(s, k, _)| *s == key && k.contains(&"*"))
                .map_or(NOT_YET, |(_, _, why)| *why)
        });
    }
    IGNORED
        .iter()
        .find(|(s, k, _)| *s == section && (k.contains(&key) || k.contains(&"*")))
        .map(|(_, _, why)| *why)
}

/// A FedML switch's value as PyYAML (which FedML uses) reads it: YAML 1.1 booleans (`yes`,
/// `on`, ...), 0/1, or empty (off).
fn switch_value(v: &Value) -> std::result::Result<bool, String> {
    let bad = || {
        format!(
            "expected true or false, got {}",
            serde_yaml_ng::to_string(v).map_or_else(|_| "?".into(), |s| s.trim().to_string())
        )
    };
    match v {
        Value::Null => Ok(false),
        Value::Bool(b) => Ok(*b),
        Value::Number(n) => match n.as_i64() {
            Some(0) => Ok(false),
            Some(1) => Ok(true),
            _ => Err(bad()),
        },
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" => Ok(true),
            "false" | "no" | "off" => Ok(false),
            _ => Err(bad()),
        },
        _ => Err(bad()),
    }
}

/// The FedML switches in `doc` that ask for what fedmq cannot do yet (or whose value is no
/// boolean), as messages.
pub(super) fn unsupported(doc: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    for (s, k, what) in UNSUPPORTED_SWITCHES {
        let Some(v) = doc.get(*s).and_then(|sec| sec.get(*k)) else {
            continue;
        };
        match switch_value(v) {
            Ok(false) => {}
            Ok(true) => problems.push(format!(
                "{s}.{k} asks for {what}, which fedmq does not have yet; set it to false (or \
                 remove the section) to run without it"
            )),
            Err(e) => problems.push(format!("{s}.{k}: {e}")),
        }
    }
    problems
}

/// A key of a section fedmq skips whole ([`UNSUPPORTED_SWITCHES`]) that looks like a misspelled
/// switch (`enable_dpp`, `enabled`, `enable-dp`): skipped with the section, it would leave the
/// feature off without a word, so it is an unknown key (with `text`'s line and the switch).
pub(super) fn misspelled_switch(doc: &Value, text: &str, path: &Path) -> Option<UnknownKey> {
    for (section, switch, _) in UNSUPPORTED_SWITCHES {
        let Some(m) = doc.get(*section).and_then(Value::as_mapping) else {
            continue;
        };
        let valid = vec![switch.to_string()];
        for key in m.keys().filter_map(Value::as_str) {
            if valid.iter().any(|v| v == key) {
                continue;
            }
            let near = closest(key, &valid);
            if near.is_none() && !key.to_ascii_lowercase().starts_with("enable") {
                continue;
            }
            let (line, column) = key_line(text, section, key).unwrap_or((0, 0));
            return Some(UnknownKey {
                path: path.to_path_buf(),
                line,
                column,
                section: section.to_string(),
                key: key.to_string(),
                suggestion: near.or_else(|| Some(switch.to_string())),
                belongs_in: None,
                valid,
                named_by: None,
            });
        }
    }
    None
}

/// FedML's asynchronous-training keys of `train_args` (FedML's asynchronous example writes
/// them): left out of the parse and handled by [`map_async`].
pub(super) const ASYNC_KEYS: &[&str] = &["is_async", "buffer_size", "max_acceptable_staleness"];

/// Reads FedML's asynchronous-training keys of `doc`'s `train_args` (found at the lines `at`
/// gives) under fedmq's names: `is_async` must agree with `federated_optimizer` (FedBuff, FedML's
/// `Async_FedAvg`), `buffer_size` and `max_acceptable_staleness` become `fedmq_args.buffer_size`
/// and `max_staleness` unless those are set. Returns the warnings, and the problems.
pub(super) fn map_async(
    doc: &Value,
    cfg: &mut Config,
    at: &dyn Fn(&str) -> String,
) -> (Vec<String>, Vec<String>) {
    let (mut notes, mut problems) = (Vec::new(), Vec::new());
    let Some(t) = doc.get("train_args") else {
        return (notes, problems);
    };
    // An empty value (`buffer_size:`) is as good as absent.
    let given = |k: &str| t.get(k).filter(|v| !v.is_null());
    let optimizer = cfg.train_args.federated_optimizer.clone();
    let fedbuff = matches!(
        optimizer.to_ascii_lowercase().as_str(),
        "fedbuff" | "async_fedavg"
    );
    if let Some(v) = given("is_async") {
        match switch_value(v) {
            Err(e) => problems.push(format!("train_args.is_async: {e}")),
            Ok(true) if !fedbuff => problems.push(format!(
                "train_args.is_async: true asks for asynchronous training, which fedmq runs as \
                 FedBuff, but federated_optimizer is {optimizer:?}; set `federated_optimizer: \
                 FedBuff` (FedML's `Async_FedAvg`) in train_args"
            )),
            Ok(false) if fedbuff => problems.push(format!(
                "train_args.is_async: false, but federated_optimizer {optimizer:?} is \
                 asynchronous; set is_async to true (or remove it), or choose a synchronous \
                 optimizer such as FedAvg"
            )),
            Ok(_) => notes.push(format!(
                "{}: train_args.is_async is FedML's switch for asynchronous training: fedmq takes \
                 it from train_args.federated_optimizer ({optimizer}), which agrees",
                at("is_async")
            )),
        }
    }
    let only = if fedbuff {
        String::new()
    } else {
        format!(" (used by FedBuff only; federated_optimizer is {optimizer})")
    };
    let own = |k: &str| {
        doc.get("fedmq_args")
            .and_then(|f| f.get(k))
            .is_some_and(|v| !v.is_null())
    };
    let count = |k: &str| -> Option<std::result::Result<u64, String>> {
        let v = given(k)?;
        Some(v.as_u64().ok_or_else(|| {
            format!(
                "train_args.{k}: expected a whole number ≥ 0, got {}",
                serde_yaml_ng::to_string(v).map_or_else(|_| "?".into(), |s| s.trim().to_string())
            )
        }))
    };
    match count("buffer_size") {
        None => {}
        Some(Err(e)) => problems.push(e),
        Some(Ok(n)) => {
            // FedML's example writes 0 for "not set".
            let value = (n > 0).then_some(n as usize);
            let ours = cfg.fedmq_args.buffer_size;
            if own("buffer_size") && ours != value {
                problems.push(format!(
                    "train_args.buffer_size: {n} (FedML's name) disagrees with \
                     fedmq_args.buffer_size: {}; keep one of them",
                    ours.map_or("unset".into(), |b| b.to_string())
                ));
            } else if own("buffer_size") {
                notes.push(format!(
                    "{}: train_args.buffer_size is FedML's name for fedmq_args.buffer_size, \
                     which is set to the same value{only}",
                    at("buffer_size")
                ));
            } else {
                cfg.fedmq_args.buffer_size = value;
                notes.push(format!(
                    "{}: train_args.buffer_size is FedML's name for fedmq_args.buffer_size: read \
                     as {}{only}",
                    at("buffer_size"),
                    value.map_or(
                        "unset (0: half of client_num_per_round)".into(),
                        |b| format!("fedmq_args.buffer_size: {b}")
                    )
                ));
            }
        }
    }
    match count("max_acceptable_staleness") {
        None => {}
        Some(Err(e)) => problems.push(e),
        Some(Ok(n)) => {
            let ours = cfg.fedmq_args.max_staleness;
            if own("max_staleness") && ours != n {
                problems.push(format!(
                    "train_args.max_acceptable_staleness: {n} (FedML's name) disagrees with \
                     fedmq_args.max_staleness: {ours}; keep one of them"
                ));
            } else if own("max_staleness") {
                notes.push(format!(
                    "{}: train_args.max_acceptable_staleness is FedML's name for \
                     fedmq_args.max_staleness, which is set to the same value{only}",
                    at("max_acceptable_staleness")
                ));
            } else {
                cfg.fedmq_args.max_staleness = n;
                notes.push(format!(
                    "{}: train_args.max_acceptable_staleness is FedML's name for \
                     fedmq_args.max_staleness: read as fedmq_args.max_staleness: {n}{only}",
                    at("max_acceptable_staleness")
                ));
            }
        }
    }
    (notes, problems)
}

/// 1-based line and column of key `key` in top-level section `section` of `text` (block style),
/// if it is there.
pub(super) fn key_line(text: &str, section: &str, key: &str) -> Option<(usize, usize)> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let is_key = |l: &str, k: &str| {
        l.trim_start()
            .strip_prefix(k)
            .is_some_and(|r| r.trim_start().starts_with(':'))
    };
    let mut inside = false;
    for (i, l) in text.lines().enumerate() {
        let t = l.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if indent(l) == 0 {
            inside = is_key(l, section);
        } else if inside && is_key(l, key) {
            return Some((i + 1, indent(l) + 1));
        }
    }
    None
}

/// Blanks line `line` (1-based) of `lines` and the lines below it that belong to its value
/// (indented deeper, or empty), keeping every other line where it was so that later errors
/// still point at the right line.
pub(super) fn blank_key(lines: &mut [String], line: usize) {
    let Some(first) = line.checked_sub(1).filter(|&i| i < lines.len()) else {
        return;
    };
    let indent = |l: &str| l.len() - l.trim_start().len();
    let own = indent(&lines[first]);
    lines[first].clear();
    for l in lines.iter_mut().skip(first + 1) {
        let t = l.trim();
        if t.is_empty()
            || t.starts_with('#')
            || indent(l) > own
            || t.starts_with("- ") && indent(l) == own
        {
            l.clear();
        } else {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sections_and_switches() {
        assert_eq!(why_ignored("tracking_args", "wandb_name"), Some(TRACKING));
        assert_eq!(
            why_ignored("comm_args", "grpc_ipconfig_path"),
            Some(BACKEND)
        );
        assert_eq!(why_ignored("", "fhe_args"), Some(NOT_YET));
        assert_eq!(
            why_ignored("", "attack_args"),
            None,
            "a section of fedmq's own"
        );
        assert_eq!(why_ignored("attack_args", "backdoor_type"), Some(ATTACK));
        assert_eq!(why_ignored("defense_args", "bucket_size"), Some(DEFENSE));
        assert_eq!(why_ignored("", "fedprox_args"), Some(FEDPROX));
        assert_eq!(why_ignored("fedprox_args", "fedprox_mu"), Some(FEDPROX));
        assert_eq!(why_ignored("", "dist_training_args"), Some(DEVICE));
        assert_eq!(why_ignored("device_args", "gpu_util_parse"), Some(DEVICE));
        assert_eq!(why_ignored("comm_args", "brokr_host"), None);
        assert_eq!(why_ignored("", "trian_args"), None);
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str("fhe_args:\n  enable_fhe: true\ndp_args:\n  enable_dp: true\n")
                .unwrap();
        let u = unsupported(&doc);
        assert_eq!(u.len(), 1);
        assert!(u[0].contains("fhe_args.enable_fhe"), "{u:?}");
    }

    #[test]
    fn blanking_a_key_keeps_line_numbers_and_siblings() {
        let text = "a:\n  x: 1\n  drop:\n    - 1\n    - 2\n\n  y: 2\nb: 3\n";
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        blank_key(&mut lines, 3);
        assert_eq!(lines, ["a:", "  x: 1", "", "", "", "", "  y: 2", "b: 3"]);
    }
}
