//! Helpers shared by the integration tests that start real brokers and servers.
// Each test binary uses a subset of these.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;

/// A free TCP port on 127.0.0.1 (bound, read and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The installed program `name` (on PATH or in the sbin directories): None (skip the test) when
/// absent, unless `CI` is set — then the test fails, since CI installs it.
pub fn installed(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain([
            "/usr/sbin".into(),
            "/usr/local/sbin".into(),
            "/usr/bin".into(),
        ])
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but {name} is missing (apt-get install -y mosquitto)"
        );
        eprintln!("skipping: {name} is not installed (apt-get install -y mosquitto)");
    }
    found
}

/// Debian's Mosquitto broker, as [`installed`].
pub fn mosquitto_bin() -> Option<PathBuf> {
    installed("mosquitto")
}

/// `<bin> broker` on 127.0.0.1:`port` as recommended for a distributed run: mutual TLS with the
/// certificates `fedmq certs` wrote to `certs` (the client certificate's name is the MQTT user)
/// and the shipped ACL. Its first stdout line names the listener; stderr is discarded.
pub fn secure_broker_command(
    bin: &std::ffi::OsStr,
    port: u16,
    certs: &std::path::Path,
) -> std::process::Command {
    let mut c = std::process::Command::new(bin);
    c.arg("broker")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--tls-cert")
        .arg(certs.join("broker.pem"))
        .arg("--tls-key")
        .arg(certs.join("broker.key"))
        .arg("--tls-client-ca")
        .arg(certs.join("ca.pem"))
        .arg("--acl-file")
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("broker/fedmq.acl"))
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    c
}

/// Mosquitto (`bin`) on 127.0.0.1:`port` with the same security as [`secure_broker_command`]:
/// mutual TLS with the certificates in `certs` (the certificate's name is the user), no
/// anonymous access, and the shipped ACL. Its config is written to `conf`.
pub fn secure_mosquitto_command(
    bin: &std::path::Path,
    port: u16,
    certs: &std::path::Path,
    conf: &std::path::Path,
) -> std::process::Command {
    let acl = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("broker/fedmq.acl");
    std::fs::write(
        conf,
        format!(
            "user root\npersistence false\nset_tcp_nodelay true\nmax_packet_size 262144\n\
             listener {port} 127.0.0.1\ncertfile {c}/broker.pem\nkeyfile {c}/broker.key\n\
             cafile {c}/ca.pem\ntls_version tlsv1.2\nrequire_certificate true\n\
             use_identity_as_username true\nallow_anonymous false\nacl_file {acl}\n",
            c = certs.display(),
            acl = acl.display()
        ),
    )
    .expect("writing mosquitto.conf");
    let mut c = std::process::Command::new(bin);
    c.arg("-c")
        .arg(conf)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c
}
