//! `fedml_config.yaml` → typed configuration.
