//! The deployment topology for real, across hosts: a hierarchical federation whose broker,
//! store, server and edge sites each run in a network namespace of their own, joined by veth
//! links to a bridge, with their own addresses (no loopback between participants). The broker is
//! Debian's Mosquitto with password authentication and the shipped ACL (each participant its own
//! MQTT user; each edge the server of its own site only); the store is moto's S3 server (PyPI
//! `moto[server]`, a third-party S3 implementation); every fedmq participant is a separate
//! `fedmq server` / `fedmq edge` / `fedmq client` process with signed messages and sealed blobs
//! (`fedmq keys --hierarchy`).
//!
//! Then: one edge site is cut off the network for 20 s (its link taken down) and the federation
//! goes on without it and takes it back when it returns; one edge is killed with SIGKILL in the
//! middle of a round (its devices held with SIGSTOP so that the round is open) and the round
//! closes with the other sites. The server's health endpoints are read over the network.
//!
//! Needs root (or password-less sudo) for `ip netns`, Mosquitto, and moto's server at
//! `$FEDMQ_MOTO_SERVER` or `target/moto-venv/bin/moto_server` (`.ci/run` installs it). Without
//! them the test is skipped, unless `CI` is set: then it fails.

mod common;

use fedmq::config::Config;
use fedmq::metrics::{read_jsonl, RoundRecord};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RUN: &str = "mh";
const EDGES: usize = 3;
const DEVICES: usize = 9;
/// Enough that rounds go on after the 20 s cut-off: a round of `mlp` over MNIST's 60,000
/// samples takes about 4 s on 2 cores (one of `lr` 0.3 s: the run would end during the cut).
const ROUNDS: usize = 20;
const ROUND_TIMEOUT_S: f64 = 15.0;
const PASSWORD: &str = "multihost-test-password";
const SECRET: &str = "multihost-test-secret";

fn skip_or_fail(why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "CI is set but the multi-host test cannot run: {why}"
    );
    eprintln!("skipping the multi-host test: {why}");
}

/// `ip`, as root or through password-less sudo.
fn ip_cmd() -> Option<Vec<String>> {
    let ok = |c: &mut Command| {
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if ok(Command::new("ip").args(["netns", "list"])) && is_root() {
        return Some(vec!["ip".into()]);
    }
    if ok(Command::new("sudo").args(["-n", "ip", "netns", "list"])) {
        return Some(vec!["sudo".into(), "-n".into(), "ip".into()]);
    }
    None
}

fn is_root() -> bool {
    // The effective uid, without a libc dependency: /proc/self/status's Uid line.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Hosts on one bridge: each a network namespace with one veth link and an address in
/// `10.213.<net>.0/24`; the test's own namespace is host `.1` (it reads the health endpoint).
struct Net {
    ip: Vec<String>,
    tag: String,
    net: u8,
    namespaces: Vec<String>,
    root_link: Option<String>,
}

impl Net {
    fn run(&self, args: &[&str]) {
        let out = Command::new(&self.ip[0])
            .args(&self.ip[1..])
            .args(args)
            .output()
            .expect("ip runs");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn new(ip: Vec<String>) -> Self {
        let pid = std::process::id();
        let tag = format!("{}", pid % 100_000);
        let net = (pid % 200) as u8 + 20;
        let mut n = Self {
            ip,
            tag,
            net,
            namespaces: Vec::new(),
            root_link: None,
        };
        let sw = n.ns("sw");
        n.run(&["netns", "add", &sw]);
        n.namespaces.push(sw.clone());
        n.run(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        n.run(&["-n", &sw, "link", "set", "br0", "up"]);
        // The test's own namespace joins as an observer.
        let (a, b) = (format!("fq{}r", n.tag), format!("fq{}R", n.tag));
        n.run(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        n.root_link = Some(a.clone());
        n.run(&["link", "set", &b, "netns", &sw]);
        n.run(&["-n", &sw, "link", "set", &b, "master", "br0", "up"]);
        n.run(&["addr", "add", &format!("{}/24", n.addr(1)), "dev", &a]);
        n.run(&["link", "set", &a, "up"]);
        n
    }

    fn ns(&self, name: &str) -> String {
        format!("fq{}{name}", self.tag)
    }

    fn addr(&self, host: u8) -> String {
        format!("10.213.{}.{host}", self.net)
    }

    /// Host `name` at `.host`: its namespace, with lo up and one link to the bridge.
    fn host(&mut self, name: &str, host: u8) -> String {
        let ns = self.ns(name);
        self.run(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        let sw = self.ns("sw");
        let (inner, outer) = (
            format!("fq{}h{host}", self.tag),
            format!("fq{}s{host}", self.tag),
        );
        self.run(&[
            "link", "add", &inner, "type", "veth", "peer", "name", &outer,
        ]);
        self.run(&["link", "set", &inner, "netns", &ns]);
        self.run(&["link", "set", &outer, "netns", &sw]);
        self.run(&["-n", &sw, "link", "set", &outer, "master", "br0", "up"]);
        self.run(&["-n", &ns, "link", "set", "lo", "up"]);
        self.run(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", self.addr(host)),
            "dev",
            &inner,
        ]);
        self.run(&["-n", &ns, "link", "set", &inner, "up"]);
        ns
    }

    /// Takes host `.host`'s link to the bridge down (cut off) or up.
    fn link(&self, host: u8, up: bool) {
        let sw = self.ns("sw");
        let outer = format!("fq{}s{host}", self.tag);
        self.run(&[
            "-n",
            &sw,
            "link",
            "set",
            &outer,
            if up { "up" } else { "down" },
        ]);
    }

    /// `program` run in namespace `ns`.
    fn command(&self, ns: &str, program: &Path) -> Command {
        let mut c = Command::new(&self.ip[0]);
        c.args(&self.ip[1..])
            .args(["netns", "exec", ns])
            .arg(program);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new(&self.ip[0])
                .args(&self.ip[1..])
                .args(args)
                .stderr(Stdio::null())
                .status();
        };
        if let Some(l) = &self.root_link {
            quiet(&["link", "del", l]);
        }
        for ns in self.namespaces.iter().rev() {
            quiet(&["netns", "del", ns]);
        }
    }
}

/// Child processes, killed when the test ends; their logs in the test directory.
struct Procs {
    children: Vec<(String, Child)>,
    logs: PathBuf,
}

impl Procs {
    fn spawn(&mut self, name: &str, mut cmd: Command) -> u32 {
        let log = std::fs::File::create(self.logs.join(format!("{name}.log"))).unwrap();
        let child = cmd
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let pid = child.id();
        self.children.push((name.to_string(), child));
        pid
    }

    fn signal(&self, name: &str, sig: &str) {
        let pid = self
            .children
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.id())
            .unwrap_or_else(|| panic!("no process {name}"));
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} {name}");
    }

    fn wait_for(&mut self, name: &str, limit: Duration) -> Option<std::process::ExitStatus> {
        let t = Instant::now();
        let i = self.children.iter().position(|(n, _)| n == name)?;
        while t.elapsed() < limit {
            if let Ok(Some(s)) = self.children[i].1.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        None
    }

    fn log_tail(&self, name: &str) -> String {
        let text =
            std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn moto_server() -> Option<PathBuf> {
    let p = std::env::var_os("FEDMQ_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("target/moto-venv/bin/moto_server")
        });
    p.is_file().then_some(p)
}

fn wait_port(addr: &str, limit: Duration) {
    let t = Instant::now();
    while t.elapsed() < limit {
        if std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(300))
            .is_ok()
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("{addr} did not answer within {limit:?}");
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3))
            .expect("health endpoint reachable");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let code = buf.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

fn records(out: &Path) -> Vec<RoundRecord> {
    read_jsonl(&out.join("metrics.jsonl")).unwrap_or_default()
}

/// Waits until the server has closed `n` rounds; returns them.
fn rounds(out: &Path, n: usize, limit: Duration, procs: &Procs) -> Vec<RoundRecord> {
    let t = Instant::now();
    loop {
        let r = records(out);
        if r.len() >= n {
            return r;
        }
        assert!(
            t.elapsed() < limit,
            "only {} of {n} rounds closed within {limit:?}\nserver:\n{}",
            r.len(),
            procs.log_tail("server")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn config(net: &Net) -> String {
    format!(
        r#"common_args:
  random_seed: 0
  run_id: "{RUN}"
data_args:
  dataset: "mnist"
  partition_method: "homo"
model_args:
  model: "mlp"
train_args:
  federated_optimizer: "HierarchicalFL"
  client_num_in_total: {DEVICES}
  client_num_per_round: {DEVICES}
  comm_round: {ROUNDS}
  group_num: {EDGES}
  group_comm_round: 1
  epochs: 1
  batch_size: 64
  client_optimizer: adam
  learning_rate: 0.001
validation_args:
  frequency_of_the_test: 1
  max_test_samples: 2000
comm_args:
  customized_training_mqtt_config:
    BROKER_HOST: "{broker}"
    BROKER_PORT: 1883
    MQTT_USER: "{{id}}"
    MQTT_PWD: "{PASSWORD}"
    MQTT_KEEPALIVE: 4
  customized_training_s3_config:
    BUCKET_NAME: fedmq
    CN_S3_AKI: fedmq
    CN_S3_SAK: "{SECRET}"
    CN_REGION_NAME: us-east-1
    CN_S3_ENDPOINT: "http://{store}:5000"
fedmq_args:
  round_timeout_s: {ROUND_TIMEOUT_S}
  quorum: 0.6
  max_retries: 1
  admission_timeout_s: 120
  signing_key: "keys/{{id}}.key"
  trusted_keys: "keys"
  edge_uplink_timeout_s: 90
"#,
        broker = net.addr(2),
        store = net.addr(3),
    )
}

#[test]
fn a_hierarchy_across_hosts_survives_a_site_cut_off_and_an_edge_killed() {
    let Some(ip) = ip_cmd() else {
        return skip_or_fail("`ip netns` needs root or password-less sudo");
    };
    let Some(mosquitto) = common::mosquitto_bin() else {
        return;
    };
    let Some(moto) = moto_server() else {
        return skip_or_fail(
            "moto's server is missing (python3 -m venv target/moto-venv && \
             target/moto-venv/bin/pip install 'moto[server]')",
        );
    };
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_fedmq"));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    if std::env::var_os("FEDMQ_TEST_KEEP").is_some() {
        eprintln!("keeping {}", d.display());
        std::mem::forget(dir);
    }
    let d = d.as_path();
    let mut net = Net::new(ip);
    let cfg_text = config(&net);
    std::fs::write(d.join("cfg.yaml"), &cfg_text).unwrap();
    let cfg: Config = serde_yaml_ng::from_str(&cfg_text).unwrap();

    // Before the hosts lose the outside world: the data set in the cache, the keys.
    let ok = |c: &mut Command, what: &str| {
        let out = c.current_dir(d).output().unwrap();
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(
        Command::new(&bin).args(["data", "fetch", "mnist", "--quiet", "-c", "cfg.yaml"]),
        "data fetch",
    );
    ok(
        Command::new(&bin).args(["keys", "--out", "keys", "--hierarchy", "-c", "cfg.yaml"]),
        "keys",
    );

    // The broker: a user per participant (one password for the test), the shipped ACL.
    let mut users = vec!["server".to_string()];
    users.extend((1..=EDGES).map(|k| fedmq::edge::edge_id(RUN, k)));
    users.extend((1..=DEVICES).map(fedmq::client::client_id));
    let passwd = d.join("passwd");
    std::fs::write(&passwd, "").unwrap();
    for u in &users {
        ok(
            Command::new("mosquitto_passwd").args(["-b", passwd.to_str().unwrap(), u, PASSWORD]),
            "mosquitto_passwd",
        );
    }
    let acl = Path::new(env!("CARGO_MANIFEST_DIR")).join("broker/fedmq.acl");
    std::fs::write(
        d.join("mosquitto.conf"),
        format!(
            "user root\nlistener 1883 0.0.0.0\nallow_anonymous false\npassword_file {}\nacl_file {}\n\
             persistence false\nset_tcp_nodelay true\nmax_packet_size 262144\nlog_dest stderr\n\
             log_type error\nlog_type warning\nlog_type notice\nconnection_messages true\n",
            passwd.display(),
            acl.display()
        ),
    )
    .unwrap();

    let broker_ns = net.host("broker", 2);
    let store_ns = net.host("store", 3);
    let server_ns = net.host("server", 4);
    let site_ns: Vec<String> = (1..=EDGES)
        .map(|k| net.host(&format!("site{k}"), 10 + k as u8))
        .collect();
    let logs = d.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut procs = Procs {
        children: Vec::new(),
        logs,
    };

    let mut c = net.command(&broker_ns, &mosquitto);
    c.arg("-c").arg(d.join("mosquitto.conf"));
    procs.spawn("mosquitto", c);
    let mut c = net.command(&store_ns, &moto);
    c.args(["-H", &net.addr(3), "-p", "5000"]);
    procs.spawn("moto", c);
    wait_port(&format!("{}:1883", net.addr(2)), Duration::from_secs(20));
    wait_port(&format!("{}:5000", net.addr(3)), Duration::from_secs(60));

    let fedmq = |procs: &mut Procs, name: &str, ns: &str, args: &[&str]| {
        let mut c = net.command(ns, &bin);
        c.args(args).current_dir(d).env("RUST_LOG", "info");
        procs.spawn(name, c)
    };
    let health = format!("{}:9464", net.addr(4));
    let server_out = d.join("server");
    fedmq(
        &mut procs,
        "server",
        &server_ns,
        &[
            "server",
            "-c",
            "cfg.yaml",
            "-o",
            server_out.to_str().unwrap(),
            "--health",
            &health,
        ],
    );
    let sites = fedmq::edge::sites(&cfg);
    for (k, members) in (1..).zip(&sites) {
        let ns = &site_ns[k - 1];
        let site = k.to_string();
        fedmq(
            &mut procs,
            &format!("edge{k}"),
            ns,
            &["edge", "-c", "cfg.yaml", "--site", &site],
        );
        for r in members {
            let rank = r.to_string();
            fedmq(
                &mut procs,
                &format!("client{r}"),
                ns,
                &["client", "-c", "cfg.yaml", "--rank", &rank],
            );
        }
    }

    // A healthy start: every site in every round.
    let first = rounds(&server_out, 2, Duration::from_secs(180), &procs);
    for r in &first {
        assert_eq!(
            r.participants, EDGES,
            "round {}: {:?}",
            r.round, r.failed_clients
        );
    }
    wait_port(&health, Duration::from_secs(5));
    let (code, _) = http_get(&health, "/readyz");
    assert_eq!(code, 200, "the server is ready while it runs");
    let (code, metrics) = http_get(&health, "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("fedmq_rounds_total{role=\"server\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("fedmq_clients_online{{role=\"server\"}} {EDGES}")),
        "{metrics}"
    );

    // Site 1 (its edge and its devices) cut off for 20 s.
    let before = records(&server_out).len();
    net.link(11, false);
    std::thread::sleep(Duration::from_secs(20));
    net.link(11, true);
    let during = records(&server_out);
    let without: Vec<&RoundRecord> = during[before..]
        .iter()
        .filter(|r| r.participants == EDGES - 1)
        .collect();
    assert!(
        !without.is_empty(),
        "the federation went on without the cut-off site: rounds since the cut {:?}",
        during[before..]
            .iter()
            .map(|r| (r.round, r.participants))
            .collect::<Vec<_>>()
    );
    // It rejoins: a later round has every site again.
    let edge1 = fedmq::edge::edge_id(RUN, 1);
    let t = Instant::now();
    let rejoined = loop {
        let r = records(&server_out);
        if let Some(back) = r[during.len()..].iter().find(|r| r.participants == EDGES) {
            break back.round;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "site 1 never came back: {:?}\nedge1:\n{}",
            r.iter()
                .map(|r| (r.round, r.participants, r.failed_clients.clone()))
                .collect::<Vec<_>>(),
            procs.log_tail("edge1")
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    eprintln!(
        "{edge1} cut off for 20 s: {} round(s) closed without it; back in round {rejoined}",
        without.len()
    );

    // Edge 2 killed inside a round: its devices are held so that its site round stays open.
    let closed = records(&server_out).len();
    rounds(&server_out, closed + 1, Duration::from_secs(60), &procs);
    let held: Vec<String> = sites[1].iter().map(|r| format!("client{r}")).collect();
    for h in &held {
        procs.signal(h, "STOP");
    }
    let open_round = records(&server_out).len() as u64 + 1;
    std::thread::sleep(Duration::from_secs(3));
    procs.signal("edge2", "KILL");
    for h in &held {
        procs.signal(h, "CONT");
    }
    let after = rounds(
        &server_out,
        open_round as usize,
        Duration::from_secs(90),
        &procs,
    );
    let r = &after[open_round as usize - 1];
    let edge2 = fedmq::edge::edge_id(RUN, 2);
    assert_eq!(
        r.participants,
        EDGES - 1,
        "round {}: {:?}",
        r.round,
        r.failed_clients
    );
    assert!(
        r.failed_clients.iter().any(|f| f.starts_with(&edge2)),
        "the killed edge is the round's failure: {:?}",
        r.failed_clients
    );

    // The run completes with the remaining sites.
    let status = procs.wait_for("server", Duration::from_secs(240));
    let all = records(&server_out);
    assert!(
        status.is_some_and(|s| s.success()),
        "server: {status:?}\n{}",
        procs.log_tail("server")
    );
    assert_eq!(all.len(), ROUNDS, "every round closed");
    let last = all.last().unwrap();
    assert!(last.test_accuracy.unwrap() > 0.8, "{last:?}");
    // The surviving edges and their devices were told the run is over.
    for k in [1, 3] {
        let s = procs.wait_for(&format!("edge{k}"), Duration::from_secs(30));
        assert!(
            s.is_some_and(|s| s.success()),
            "edge{k}: {s:?}\n{}",
            procs.log_tail(&format!("edge{k}"))
        );
    }
    eprintln!(
        "{} rounds: participants {:?}",
        all.len(),
        all.iter().map(|r| r.participants).collect::<Vec<_>>()
    );
}
