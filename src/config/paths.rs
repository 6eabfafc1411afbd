//! The configuration keys that hold file or directory paths, and `~` expansion over them.
//!
//! FedML's examples write paths such as `data_cache_dir: ~/.cache/fedml_data`; a shell would
//! expand the `~`, a YAML file does not. [`Config::load_for`](super::Config::load_for) expands a
//! leading `~` (alone or followed by `/`) to the home directory in every key of [`slots`], so the
//! rest of fedmq never sees one. `~user` forms are left as written.

use super::Config;
use std::path::Path;

/// One path-valued field of [`Config`].
pub(super) enum Slot<'a> {
    /// A key that is always present (empty: unset).
    Str(&'a mut String),
    /// A key FedML may leave out or empty.
    Opt(&'a mut Option<String>),
}

/// Every path-valued key of the configuration, dotted as in the file, with its field.
///
/// This is the one list of path keys: `~` expansion goes over it, and a test checks that every key
/// whose name says "path" (`*_path`, `*_dir`, `*_file`, `*_folder`, `*_PATH`, ...) is in it.
pub(super) fn slots(c: &mut Config) -> Vec<(&'static str, Slot<'_>)> {
    let m = &mut c.comm_args.customized_training_mqtt_config;
    let s = &mut c.comm_args.customized_training_s3_config;
    let f = &mut c.fedmq_args;
    vec![
        (
            "environment_args.bootstrap",
            Slot::Opt(&mut c.environment_args.bootstrap),
        ),
        (
            "data_args.data_cache_dir",
            Slot::Str(&mut c.data_args.data_cache_dir),
        ),
        (
            "model_args.model_file_cache_folder",
            Slot::Opt(&mut c.model_args.model_file_cache_folder),
        ),
        (
            "model_args.global_model_file_path",
            Slot::Opt(&mut c.model_args.global_model_file_path),
        ),
        (
            "device_args.gpu_mapping_file",
            Slot::Opt(&mut c.device_args.gpu_mapping_file),
        ),
        (
            "comm_args.mqtt_config_path",
            Slot::Opt(&mut c.comm_args.mqtt_config_path),
        ),
        (
            "comm_args.s3_config_path",
            Slot::Opt(&mut c.comm_args.s3_config_path),
        ),
        (
            "comm_args.customized_training_mqtt_config.MQTT_CA_PATH",
            Slot::Str(&mut m.mqtt_ca_path),
        ),
        (
            "comm_args.customized_training_mqtt_config.MQTT_CERT_PATH",
            Slot::Str(&mut m.mqtt_cert_path),
        ),
        (
            "comm_args.customized_training_mqtt_config.MQTT_KEY_PATH",
            Slot::Str(&mut m.mqtt_key_path),
        ),
        (
            "comm_args.customized_training_s3_config.CN_S3_CA_PATH",
            Slot::Str(&mut s.cn_s3_ca_path),
        ),
        (
            "tracking_args.log_file_dir",
            Slot::Str(&mut c.tracking_args.log_file_dir),
        ),
        ("fedmq_args.signing_key", Slot::Str(&mut f.signing_key)),
        ("fedmq_args.trusted_keys", Slot::Str(&mut f.trusted_keys)),
        (
            "fedmq_args.store_credentials",
            Slot::Str(&mut f.store_credentials),
        ),
    ]
}

/// The dotted names of every path-valued key (see [`slots`]).
pub fn path_keys() -> Vec<&'static str> {
    slots(&mut Config::default())
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// `p` with a leading `~` (alone, or followed by `/`) replaced by `home`; `None` when there is
/// nothing to expand (or no home directory is known).
fn expand(p: &str, home: Option<&Path>) -> Option<String> {
    let rest = if p == "~" { "" } else { p.strip_prefix("~/")? };
    let home = home?;
    Some(if rest.is_empty() {
        home.display().to_string()
    } else {
        home.join(rest).display().to_string()
    })
}

/// Expands `~` in every path key of `c` with `home` as the home directory.
pub(super) fn expand_home(c: &mut Config, home: Option<&Path>) {
    for (_, slot) in slots(c) {
        let value = match slot {
            Slot::Str(s) => s,
            Slot::Opt(Some(s)) => s,
            Slot::Opt(None) => continue,
        };
        if let Some(e) = expand(value.trim(), home) {
            *value = e;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_yaml_ng::Value;

    /// Leaf keys of the default configuration, dotted.
    fn leaves(v: &Value, prefix: &str, out: &mut Vec<String>) {
        if let Value::Mapping(m) = v {
            for (k, v) in m {
                let k = k.as_str().unwrap();
                let dotted = if prefix.is_empty() {
                    k.to_string()
                } else {
                    format!("{prefix}.{k}")
                };
                if v.is_mapping() {
                    leaves(v, &dotted, out);
                } else {
                    out.push(dotted);
                }
            }
        }
    }

    #[test]
    fn every_path_like_key_is_listed_and_every_listed_key_exists() {
        let tree = serde_yaml_ng::to_value(Config::default()).unwrap();
        let mut all = Vec::new();
        leaves(&tree, "", &mut all);
        let listed = path_keys();
        for k in &listed {
            assert!(all.iter().any(|a| a == k), "{k} is not a config key");
        }
        // Keys whose names say they hold a path, plus the fedmq keys that name key files.
        let path_like = |k: &str| {
            let last = k.rsplit('.').next().unwrap().to_ascii_lowercase();
            ["_path", "_dir", "_file", "_folder", "_keys", "_credentials"]
                .iter()
                .any(|s| last.ends_with(s))
                || ["bootstrap", "signing_key"].contains(&last.as_str())
        };
        for k in all.iter().filter(|k| path_like(k)) {
            assert!(
                listed.contains(&k.as_str()),
                "{k} looks like a path key but is not in paths::slots"
            );
        }
        let mut unique = listed.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), listed.len());
    }

    #[test]
    fn tilde_is_expanded_in_every_path_key() {
        let home = Path::new("/home/u");
        let mut c = Config::default();
        for (k, slot) in slots(&mut c) {
            let v = format!("~/{k}");
            match slot {
                Slot::Str(s) => *s = v,
                Slot::Opt(o) => *o = Some(v),
            }
        }
        expand_home(&mut c, Some(home));
        for (k, slot) in slots(&mut c) {
            let v = match slot {
                Slot::Str(s) => s.clone(),
                Slot::Opt(o) => o.clone().unwrap(),
            };
            assert_eq!(v, format!("/home/u/{k}"), "{k}");
        }
        // The other keys are left alone (a password may start with `~/`).
        c.comm_args.customized_training_mqtt_config.mqtt_pwd = "~/pw".into();
        expand_home(&mut c, Some(home));
        assert_eq!(c.comm_args.customized_training_mqtt_config.mqtt_pwd, "~/pw");
    }

    #[test]
    fn only_a_leading_home_tilde_is_expanded() {
        let home = Some(Path::new("/home/u"));
        assert_eq!(expand("~", home).as_deref(), Some("/home/u"));
        assert_eq!(expand("~/", home).as_deref(), Some("/home/u"));
        assert_eq!(
            expand("~/.cache/fedml_data", home).as_deref(),
            Some("/home/u/.cache/fedml_data")
        );
        for unchanged in ["~other/x", "a/~/b", "/abs", "rel", "", "~~/x"] {
            assert_eq!(expand(unchanged, home), None, "{unchanged}");
        }
        // No home directory known: the value stays as written.
        assert_eq!(expand("~/x", None), None);
        let mut c = Config::default();
        c.data_args.data_cache_dir = "~/d".into();
        c.comm_args.mqtt_config_path = None;
        expand_home(&mut c, None);
        assert_eq!(c.data_args.data_cache_dir, "~/d");
    }
}
