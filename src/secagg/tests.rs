//! The whole protocol in memory: clients and a server session exchanging the stage messages,
//! with dropouts at each stage, and the requests a client must refuse.

use super::*;
use crate::proto::{SaCollect, SaUnmask};
use crate::secagg::client::Reveal;
use crate::tensor::{NamedTensor, ParamSet};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use std::collections::{BTreeMap, BTreeSet};

const P: usize = 1000;

fn model(values: Vec<f32>) -> ParamSet {
    let half = values.len() / 2;
    ParamSet::new(vec![
        NamedTensor::new("a", vec![half], values[..half].to_vec()).unwrap(),
        NamedTensor::new("b", vec![values.len() - half], values[half..].to_vec()).unwrap(),
    ])
    .unwrap()
}

struct Run {
    ids: Vec<String>,
    server: ServerSession,
    clients: BTreeMap<String, ClientSession>,
    global: ParamSet,
    trained: BTreeMap<String, ParamSet>,
    samples: BTreeMap<String, u64>,
}

impl Run {
    fn new(n: usize, seed: u64) -> Self {
        Self::with(n, seed, Params::for_clients(n).into())
    }

    fn light(n: usize, seed: u64) -> Self {
        Self::with(n, seed, Method::Light(LightParams::for_clients(n)))
    }

    fn with(n: usize, seed: u64, method: Method) -> Self {
        let ids: Vec<String> = (1..=n).map(|i| format!("client-{i:02}")).collect();
        let server = ServerSession::new("run", 3, &ids, method, 1.0, seed, P, 1000).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let global = model((0..P).map(|_| rng.random_range(-1.0..1.0)).collect());
        let mut trained = BTreeMap::new();
        let mut samples = BTreeMap::new();
        for id in &ids {
            let t: Vec<f32> = global
                .iter()
                .flat_map(|t| t.data().to_vec())
                .map(|g| g + rng.random_range(-0.5f32..0.5))
                .collect();
            trained.insert(id.clone(), model(t));
            samples.insert(id.clone(), rng.random_range(10..1000));
        }
        Self {
            ids,
            server,
            clients: BTreeMap::new(),
            global,
            trained,
            samples,
        }
    }

    /// Runs the stages; clients in `drop[s]` fall silent before stage `s` (0: keys, 1: shares,
    /// 2: masked input, 3: unmask).
    fn run(&mut self, drop: [&[&str]; 4]) -> Result<Unmasked, SecAggError> {
        let gone = |s: usize, id: &str| drop[..=s].iter().any(|d| d.contains(&id));
        let setup = self.server.setup().clone();
        for id in self.ids.clone() {
            if gone(0, &id) {
                continue;
            }
            let (c, keys) = ClientSession::new("run", 3, &id, &setup, self.samples[&id]).unwrap();
            self.server.add_keys(&id, &keys, self.samples[&id]).unwrap();
            self.clients.insert(id, c);
        }
        let rosters = self.server.rosters()?;
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        for (id, roster) in &rosters {
            if gone(1, id) {
                continue;
            }
            let b = self
                .clients
                .get_mut(id)
                .unwrap()
                .on_roster(roster, &mut rng)?;
            self.server.add_shares(id, blob_ref(id)).unwrap();
            self.server.add_bundle(id, &b).unwrap();
        }
        let collects = self.server.collects()?;
        for (id, (sharing, inbox)) in &collects {
            if gone(2, id) {
                continue;
            }
            let c = self.clients.get_mut(id).unwrap();
            c.on_collect(&collect_of(sharing, id), inbox)?;
            let y = c.masked_input(&self.global, &self.trained[id])?;
            self.server.add_masked(id, &y).unwrap();
        }
        let requests = self.server.unmask_requests()?;
        for (id, req) in &requests {
            if gone(3, id) {
                continue;
            }
            match self.clients.get_mut(id).unwrap().on_unmask(req)? {
                Reveal::Shares(r) => self.server.add_reveal(id, &r).unwrap(),
                Reveal::MaskShare(sum) => {
                    self.server.note_mask_share(id).unwrap();
                    let blob = light::encode_aggregate(&sum);
                    self.server.add_mask_share(id, &blob).unwrap();
                }
            }
        }
        self.server.finish()
    }

    /// The plain weighted mean update of `survivors`.
    fn expected(&self, survivors: &[String]) -> Vec<f64> {
        let g: Vec<f32> = self.global.iter().flat_map(|t| t.data().to_vec()).collect();
        let total: f64 = survivors.iter().map(|s| self.samples[s] as f64).sum();
        let mut out = vec![0f64; P];
        for s in survivors {
            let w = self.samples[s] as f64 / total;
            let t: Vec<f32> = self.trained[s]
                .iter()
                .flat_map(|t| t.data().to_vec())
                .collect();
            for (o, (t, g)) in out.iter_mut().zip(t.iter().zip(&g)) {
                *o += w * f64::from(t - g);
            }
        }
        out
    }
}

/// The collect message the server sends `id` (the inbox reference is not used in memory).
fn collect_of(sharing: &[String], id: &str) -> SaCollect {
    SaCollect {
        sharing: sharing.to_vec(),
        inbox: blob_ref(id),
    }
}

fn blob_ref(id: &str) -> crate::proto::BlobRef {
    crate::proto::BlobRef {
        key: format!("run/r000003/shares/{id}"),
        len: 1,
        sha256: "0".repeat(64),
        wrapped_key: None,
    }
}

fn check(run: &Run, u: &Unmasked, survivors: &[&str]) {
    let want: Vec<String> = survivors.iter().map(|s| s.to_string()).collect();
    assert_eq!(u.survivors, want);
    let exp = run.expected(&want);
    // f32 rounding of the scaled update adds a little to the quantization bound.
    let tol = u.error_bound + 1e-6;
    for (i, (a, b)) in u.mean_update.iter().zip(&exp).enumerate() {
        assert!(
            (f64::from(*a) - b).abs() <= tol,
            "coordinate {i}: {a} vs {b} (bound {tol})"
        );
    }
}

fn all(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("client-{i:02}")).collect()
}

fn except(n: usize, gone: &[&str]) -> Vec<String> {
    all(n)
        .into_iter()
        .filter(|c| !gone.contains(&c.as_str()))
        .collect()
}

#[test]
fn without_dropouts_the_server_gets_the_weighted_mean() {
    let mut run = Run::new(10, 1);
    let u = run.run([&[], &[], &[], &[]]).unwrap();
    let ids = all(10);
    check(
        &run,
        &u,
        &ids.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert!(u.error_bound < 1e-7, "{}", u.error_bound);
}

#[test]
fn dropouts_at_every_stage_leave_exactly_the_survivors_sum() {
    // Two never advertise, one drops after its keys, two after sharing (their pairwise masks
    // must be removed), one after its masked input (still in the sum).
    let dropped = [
        &["client-01", "client-02"][..],
        &["client-03"][..],
        &["client-04", "client-05"][..],
        &["client-06"][..],
    ];
    let mut run = Run::new(14, 2);
    let u = run.run(dropped).unwrap();
    let survivors = except(
        14,
        &[
            "client-01",
            "client-02",
            "client-03",
            "client-04",
            "client-05",
        ],
    );
    check(
        &run,
        &u,
        &survivors.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

#[test]
fn a_sparse_graph_unmasks_with_thirty_percent_dropout() {
    let mut run = Run::new(60, 3);
    let p = Params::for_clients(60);
    assert!(p.degree < 59, "{p:?}");
    let late: Vec<String> = (1..=18).map(|i| format!("client-{:02}", i * 3)).collect();
    let late_refs: Vec<&str> = late.iter().map(String::as_str).collect();
    let u = run.run([&[], &[], &late_refs, &[]]).unwrap();
    let survivors = except(60, &late_refs);
    check(
        &run,
        &u,
        &survivors.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

#[test]
fn below_the_threshold_nothing_is_unmasked() {
    // t = 6 of 10: seven dropping before the masked input leave 3.
    let seven = [
        "client-01",
        "client-02",
        "client-03",
        "client-04",
        "client-05",
        "client-06",
        "client-07",
    ];
    let mut run = Run::new(10, 4);
    let e = run.run([&[], &[], &seven, &[]]).unwrap_err();
    assert!(
        matches!(
            e,
            SecAggError::BelowThreshold {
                got: 3,
                needed: 6,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(run.server.stage(), Stage::Done);
    // Seven leaving after their masked inputs: the survivors' self-mask shares are too few.
    let mut run = Run::new(10, 5);
    let e = run.run([&[], &[], &[], &seven]).unwrap_err();
    assert!(
        matches!(e, SecAggError::BelowThreshold { got: 3, .. }),
        "{e}"
    );
}

/// A client that has sent its masked input, with the request the server would send it.
/// Every client of `run` advertises and shares: the bundles, and what the server then gives
/// each client (its sharing neighbours and its inbox).
fn share_all(run: &mut Run) -> (BTreeMap<String, Vec<u8>>, super::Inboxes) {
    let setup = run.server.setup().clone();
    for id in &run.ids.clone() {
        let (c, k) = ClientSession::new("run", 3, id, &setup, 10).unwrap();
        run.server.add_keys(id, &k, 10).unwrap();
        run.clients.insert(id.clone(), c);
    }
    let rosters = run.server.rosters().unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let mut bundles = BTreeMap::new();
    for (id, r) in &rosters {
        let b = run
            .clients
            .get_mut(id)
            .unwrap()
            .on_roster(r, &mut rng)
            .unwrap();
        run.server.add_shares(id, blob_ref(id)).unwrap();
        run.server.add_bundle(id, &b).unwrap();
        bundles.insert(id.clone(), b);
    }
    let inboxes = run.server.collects().unwrap();
    (bundles, inboxes)
}

/// Every client of `run` shares; `me` then reads its inbox and masks its update. Its masked input,
/// and what the server gave each client.
fn mask_one(run: &mut Run, me: &str) -> (Vec<u32>, super::Inboxes) {
    let (_, collects) = share_all(run);
    let (sharing, inbox) = &collects[me];
    let c = run.clients.get_mut(me).unwrap();
    c.on_collect(&collect_of(sharing, me), inbox).unwrap();
    let y = c.masked_input(&run.global, &run.trained[me]).unwrap();
    (y, collects)
}

fn masked_client() -> (Run, String, SaUnmask) {
    let mut run = Run::new(5, 6);
    let me = "client-01".to_string();
    mask_one(&mut run, &me);
    let req = SaUnmask {
        survivors: vec!["client-02".into(), "client-03".into()],
        dropped: vec!["client-04".into()],
    };
    (run, me, req)
}

#[test]
fn a_client_never_reveals_both_shares_of_one_neighbour() {
    let (mut run, me, req) = masked_client();
    let c = run.clients.get_mut(&me).unwrap();
    // Named in both lists at once.
    let both = SaUnmask {
        survivors: vec!["client-02".into()],
        dropped: vec!["client-02".into()],
    };
    assert!(matches!(c.on_unmask(&both), Err(SecAggError::Refused(_))));
    let Reveal::Shares(reveal) = c.on_unmask(&req).unwrap() else {
        panic!("SecAgg+ reveals shares")
    };
    assert_eq!(reveal.mask_keys.len(), 1);
    assert_eq!(reveal.self_masks.len(), 3, "two survivors and itself");
    // A second request that flips a survivor to dropped: refused.
    let flipped = SaUnmask {
        survivors: vec![],
        dropped: vec!["client-02".into()],
    };
    let e = c.on_unmask(&flipped).unwrap_err();
    assert!(e.to_string().contains("client-02"), "{e}");
    // And the other way round.
    let flipped = SaUnmask {
        survivors: vec!["client-04".into()],
        dropped: vec![],
    };
    assert!(c.on_unmask(&flipped).is_err());
    // Itself as dropped, or a stranger.
    let (mut run, me, _) = masked_client();
    let c = run.clients.get_mut(&me).unwrap();
    for bad in [
        SaUnmask {
            survivors: vec![],
            dropped: vec![me.clone()],
        },
        SaUnmask {
            survivors: vec!["client-99".into()],
            dropped: vec![],
        },
    ] {
        assert!(
            matches!(c.on_unmask(&bad), Err(SecAggError::Refused(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn a_share_sealed_for_one_neighbour_opens_for_no_other() {
    let mut run = Run::new(4, 8);
    let (bundles, collects) = share_all(&mut run);
    let me = "client-01";
    let (sharing, inbox) = &collects[me];
    let collect = collect_of(sharing, me);
    let c = run.clients.get_mut(me).unwrap();
    // client-02's inbox handed to client-01: made for another client.
    let e = c
        .on_collect(&collect, &collects["client-02"].1)
        .unwrap_err();
    assert!(e.to_string().contains("another client"), "{e}");
    // An entry of client-02's inbox moved into client-01's: sealed for another holder.
    let text = String::from_utf8(inbox.clone()).unwrap();
    let other = String::from_utf8(collects["client-02"].1.clone()).unwrap();
    let ct = |t: &str| {
        let at = t.find("\"ct\":\"").unwrap() + 6;
        t[at..at + 2 * super::bundle::CIPHERTEXT_BYTES].to_string()
    };
    let moved = text.replacen(&ct(&text), &ct(&other), 1).into_bytes();
    let e = c.on_collect(&collect, &moved).unwrap_err();
    assert!(e.to_string().contains("does not decrypt"), "{e}");
    // One flipped ciphertext digit: the tag fails.
    let at = text.find("\"ct\":\"").unwrap() + 6;
    let mut chars: Vec<char> = text.chars().collect();
    chars[at] = if chars[at] == '0' { '1' } else { '0' };
    let flipped = chars.into_iter().collect::<String>().into_bytes();
    let e = c.on_collect(&collect, &flipped).unwrap_err();
    assert!(e.to_string().contains("does not decrypt"), "{e}");
    // The server checks every bundle before it gathers the inboxes: another round's, another
    // owner's, or one without exactly one entry per neighbour is refused.
    let owner = "client-01";
    let others: Vec<String> = run.ids.iter().filter(|i| *i != owner).cloned().collect();
    let b = &bundles[owner];
    super::bundle::check_bundle(b, "run|3", owner, &others).unwrap();
    assert!(super::bundle::check_bundle(b, "run|4", owner, &others).is_err());
    assert!(super::bundle::check_bundle(b, "run|3", "client-02", &others).is_err());
    let e = super::bundle::check_bundle(b, "run|3", owner, &others[..2]).unwrap_err();
    assert!(e.to_string().contains("one per neighbour"), "{e}");
}

#[test]
fn the_server_refuses_replays_strangers_and_out_of_stage_messages() {
    let mut run = Run::new(4, 10);
    let setup = run.server.setup().clone();
    let (_, k1) = ClientSession::new("run", 3, "client-01", &setup, 10).unwrap();
    run.server.add_keys("client-01", &k1, 10).unwrap();
    // The same keys again, from itself or replayed under another id.
    assert!(run.server.add_keys("client-01", &k1, 10).is_err());
    assert!(run.server.add_keys("client-02", &k1, 10).is_err());
    let (_, k9) = ClientSession::new("run", 3, "client-09", &setup, 10).unwrap();
    assert!(
        run.server.add_keys("client-09", &k9, 10).is_err(),
        "not selected"
    );
    assert!(run
        .server
        .add_shares("client-01", blob_ref("client-01"))
        .is_err());
    assert!(run.server.add_masked("client-01", &[0; P]).is_err());
}

#[test]
fn what_the_server_holds_of_one_client_looks_uniform_and_unrelated_to_its_update() {
    let mut run = Run::new(10, 11);
    let (_, collects) = share_all(&mut run);
    let me = "client-01";
    let (sharing, inbox) = &collects[me];
    let c = run.clients.get_mut(me).unwrap();
    c.on_collect(&collect_of(sharing, me), inbox).unwrap();
    // An update with a strong structure: a ramp.
    let ramp = model((0..P).map(|i| i as f32 / P as f32).collect());
    let zero = model(vec![0.0; P]);
    let y = c.masked_input(&zero, &ramp).unwrap();
    let plain: Vec<f64> = (0..P).map(|i| i as f64).collect();
    let masked: Vec<f64> = y.iter().map(|v| f64::from(*v)).collect();
    // Uniform on [0, 2^32): mean 2^31, and each of 16 buckets near P/16.
    let mean = masked.iter().sum::<f64>() / P as f64;
    assert!((mean / 2f64.powi(31) - 1.0).abs() < 0.1, "mean {mean}");
    let mut buckets = [0usize; 16];
    for v in &y {
        buckets[(*v >> 28) as usize] += 1;
    }
    let chi2: f64 = buckets
        .iter()
        .map(|&b| (b as f64 - P as f64 / 16.0).powi(2) / (P as f64 / 16.0))
        .sum();
    // 15 degrees of freedom: p = 0.001 at 37.7.
    assert!(chi2 < 37.7, "chi-square {chi2}, buckets {buckets:?}");
    let corr = correlation(&plain, &masked);
    assert!(corr.abs() < 0.15, "correlation with the update {corr}");
    let set: BTreeSet<u32> = y.iter().copied().collect();
    assert!(set.len() > P - 5, "masked values repeat");
}

fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

#[test]
fn masked_blobs_round_trip_and_others_are_refused() {
    let v: Vec<u32> = (0..100).map(|i| i * 7919).collect();
    assert_eq!(decode_masked(&encode_masked(&v)).unwrap(), v);
    let model = model(vec![1.0; 10]).to_safetensors_bytes();
    assert!(decode_masked(&model).is_err());
    assert!(decode_masked(b"garbage").is_err());
}

#[test]
fn lightsecagg_unmasks_the_survivors_mean_with_dropouts_at_every_stage() {
    // N = 10: U = 7, T = 5.
    let mut run = Run::light(10, 21);
    assert_eq!(run.server.setup().method, "lightsecagg");
    let u = run.run([&[], &[], &[], &[]]).unwrap();
    check(
        &run,
        &u,
        &all(10).iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // One gone before keys, one before sharing, one before masking: 7 survivors, all needed.
    let mut run = Run::light(10, 22);
    let gone = ["client-02", "client-05", "client-09"];
    let u = run.run([&gone[..1], &gone[1..2], &gone[2..], &[]]).unwrap();
    let left = except(10, &gone);
    check(
        &run,
        &u,
        &left.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    // Three gone after masking, before unmasking: their inputs are in, 7 aggregate shares.
    let mut run = Run::light(10, 23);
    let gone = ["client-01", "client-04", "client-10"];
    let u = run.run([&[], &[], &[], &gone]).unwrap();
    check(
        &run,
        &u,
        &all(10).iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

#[test]
fn lightsecagg_below_u_unmasks_nothing() {
    // Four gone before masking (6 masked inputs), or after it (6 aggregate shares): U = 7.
    let gone = ["client-01", "client-02", "client-03", "client-04"];
    for (seed, drop) in [
        (24, [&[][..], &[], &gone, &[]]),
        (25, [&[], &[], &[], &gone]),
    ] {
        let mut run = Run::light(10, seed);
        let e = run.run(drop).unwrap_err();
        assert!(
            matches!(
                e,
                SecAggError::BelowThreshold {
                    got: 6,
                    needed: 7,
                    ..
                }
            ),
            "{e}"
        );
    }
}

#[test]
fn a_lightsecagg_client_sums_only_large_survivor_sets_once() {
    let mut run = Run::light(10, 26);
    let me = "client-01".to_string();
    mask_one(&mut run, &me);
    let c = run.clients.get_mut(&me).unwrap();
    let ask = |survivors: &[String], dropped: &[&str]| SaUnmask {
        survivors: survivors.to_vec(),
        dropped: dropped.iter().map(|d| d.to_string()).collect(),
    };
    // The sum over a set smaller than U = 7 could single out one client's mask.
    let small = all(6);
    let e = c.on_unmask(&ask(&small, &[])).unwrap_err();
    assert!(e.to_string().contains("fewer than U = 7"), "{e}");
    // A set without this client, or with dropped clients listed, or a stranger.
    assert!(c.on_unmask(&ask(&except(10, &["client-01"]), &[])).is_err());
    assert!(c.on_unmask(&ask(&all(8), &["client-09"])).is_err());
    let mut strangers = all(8);
    strangers.push("client-99".into());
    assert!(c.on_unmask(&ask(&strangers, &[])).is_err());
    let Reveal::MaskShare(sum) = c.on_unmask(&ask(&all(8), &[])).unwrap() else {
        panic!("LightSecAgg reveals an aggregate share")
    };
    assert_eq!(sum.len(), LightParams::for_clients(10).share_len(P));
    // One aggregate share per round: a second set is refused.
    let e = c.on_unmask(&ask(&all(10), &[])).unwrap_err();
    assert!(e.to_string().contains("second"), "{e}");
}

#[test]
fn what_the_server_holds_of_a_lightsecagg_client_looks_uniform() {
    // The masked input of one client, over GF(2^32 − 5): its top bits are uniform, and it is
    // uncorrelated with the client's quantized update.
    let mut run = Run::light(10, 27);
    let me = "client-03".to_string();
    let (y, collects) = mask_one(&mut run, &me);
    let (sharing, inbox) = &collects[&me];
    let mean = y.iter().map(|v| f64::from(*v)).sum::<f64>() / y.len() as f64;
    let half = light::Q as f64 / 2.0;
    assert!((mean - half).abs() < half * 0.1, "mean {mean} vs {half}");
    let g: Vec<f32> = run.global.iter().flat_map(|t| t.data().to_vec()).collect();
    let t: Vec<f32> = run.trained[&me]
        .iter()
        .flat_map(|t| t.data().to_vec())
        .collect();
    let update: Vec<f64> = t.iter().zip(&g).map(|(t, g)| f64::from(t - g)).collect();
    let masked: Vec<f64> = y.iter().map(|v| f64::from(*v)).collect();
    assert!(correlation(&update, &masked).abs() < 0.15);
    // The server's bundle entries for this client are sealed: what it gathered for client-03
    // does not open for client-04.
    let other = "client-04".to_string();
    let c4 = run.clients.get_mut(&other).unwrap();
    assert!(c4.on_collect(&collect_of(sharing, &other), inbox).is_err());
}
