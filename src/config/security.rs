//! FedML's robustness and privacy sections: `attack_args` (clients that attack the federation,
//! for measuring defenses), `defense_args` (robust aggregation and the backdoor defense) and
//! `dp_args` (differential privacy). The keys are FedML's where FedML has one; what each value
//! does is in `crate::attack`, `crate::strategy::robust` and `crate::privacy`, which also check
//! the values (`Config::validate` reports their errors with the key).

use serde::{Deserialize, Serialize};

/// `attack_args`: which clients attack, and how. An attacking client is an ordinary client
/// (`fedmq client`, or one of `fedmq run`'s) whose config switches an attack on for its rank.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AttackArgs {
    /// Turns the attack on.
    pub enable_attack: bool,
    /// `byzantine`, `label_flipping`, `model_replacement` (pixel-pattern backdoor, boosted
    /// update) or `norm_constrained_backdoor` (the same backdoor, kept under a norm bound).
    pub attack_type: String,
    /// Byzantine updates: `zero`, `random`, `flip` (the update's sign) or `scale`.
    pub attack_mode: String,
    /// How many clients attack (any attack type).
    pub byzantine_client_num: usize,
    /// The attackers as a fraction of `client_num_in_total` (FedML's key; used when
    /// `byzantine_client_num` is 0).
    pub ratio_of_poisoned_client: Option<f64>,
    /// One attacking client by rank (FedML's key): overrides the two above.
    pub malicious_client_id: Option<usize>,
    /// Label flipping: these classes ...
    pub original_class_list: Vec<u32>,
    /// ... are relabelled as these (same length).
    pub target_class_list: Vec<u32>,
    /// First round the attack runs in (default 1).
    pub poison_start_round_id: Option<u64>,
    /// Last round the attack runs in (default: every round).
    pub poison_end_round_id: Option<u64>,
    /// `scale` mode: the update is multiplied by this.
    pub scale_factor: f64,
    /// Model replacement: scale the update to this L2 norm (FedML's `scale_factor_S`); by default
    /// it is boosted by `client_num_per_round / server_lr` (Bagdasaryan et al.).
    #[serde(rename = "scale_factor_S")]
    pub scale_factor_s: Option<f64>,
    /// Backdoors: the label triggered inputs should get.
    pub backdoor_target: u32,
    /// Backdoors: the fraction of the attacker's samples it trains with the trigger.
    pub poison_frac: f64,
    /// Norm-constrained backdoor: the L2 bound the update is kept under (set it to the
    /// defense's clipping bound the attacker expects).
    pub norm_bound: f64,
    /// An attacker claims this many times its real sample count (when it joins and with every
    /// update), to weigh more in a sample-weighted mean; 1: the truth.
    pub sample_boost: f64,
}

impl Default for AttackArgs {
    fn default() -> Self {
        Self {
            enable_attack: false,
            attack_type: "byzantine".into(),
            attack_mode: "random".into(),
            byzantine_client_num: 0,
            ratio_of_poisoned_client: None,
            malicious_client_id: None,
            original_class_list: Vec::new(),
            target_class_list: Vec::new(),
            poison_start_round_id: None,
            poison_end_round_id: None,
            scale_factor: 10.0,
            scale_factor_s: None,
            backdoor_target: 0,
            poison_frac: 0.5,
            norm_bound: 2.0,
            sample_boost: 1.0,
        }
    }
}

/// `defense_args`: how the server aggregates when clients may be malicious.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DefenseArgs {
    /// Turns the defense on.
    pub enable_defense: bool,
    /// `median` (FedML's `wise_median`), `trimmed_mean`, `krum`, `multikrum`, `geo_median` /
    /// `rfa`, `norm_diff_clipping`, `cclip`, `foolsgold`, `fltrust`, `barfed`, `weak_dp`.
    pub defense_type: String,
    /// Krum, Multi-Krum: the Byzantine clients to tolerate (`f`).
    pub byzantine_client_num: usize,
    /// Multi-Krum: how many of the best-scored updates are averaged (`m`; default `n − f`).
    pub krum_param_m: Option<usize>,
    /// Trimmed mean: the fraction trimmed at each end (FedML's key).
    pub beta: Option<f64>,
    /// Trimmed mean: the number trimmed at each end (overrides `beta`; default: `f`).
    pub trim_param_b: Option<usize>,
    /// Norm-difference clipping and weak DP: the L2 bound of each update.
    pub norm_bound: f64,
    /// Weak DP: the standard deviation of the Gaussian noise on the aggregate.
    pub stddev: f64,
    /// Centered clipping: the clipping radius `τ`.
    pub tau: f64,
    /// Centered clipping: iterations per round.
    pub cclip_iters: usize,
    /// FLTrust: samples of the server's root data set (taken from the training split, seeded,
    /// and never given to a client's partition accounting; a real deployment brings its own).
    pub root_data_size: usize,
    /// BARFED: the fence factor `k` of the per-layer threshold `Q3 + k·IQR`.
    pub barfed_fence: f64,
    /// Geometric median (RFA): Weiszfeld iterations at most.
    pub rfa_max_iter: usize,
}

impl Default for DefenseArgs {
    fn default() -> Self {
        Self {
            enable_defense: false,
            defense_type: "median".into(),
            byzantine_client_num: 0,
            krum_param_m: None,
            beta: None,
            trim_param_b: None,
            norm_bound: 5.0,
            stddev: 0.025,
            tau: 10.0,
            cclip_iters: 1,
            root_data_size: 0,
            barfed_fence: 1.5,
            rfa_max_iter: 10,
        }
    }
}

/// `dp_args`: differential privacy of the clients' data against what leaves them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DpArgs {
    /// Turns differential privacy on.
    pub enable_dp: bool,
    /// `cdp` (the server clips each update and noises the sum: DP-FedAvg), `ldp` (each client
    /// noises its own update), `ddp` (distributed: each client adds its share of the noise
    /// before secure aggregation masks it).
    pub dp_solution_type: String,
    /// `gaussian` or `laplace` (`ldp` only).
    pub mechanism_type: String,
    /// The privacy budget: with `cdp`/`ddp`, the noise multiplier is chosen so the run spends
    /// at most this by its last round (unless `noise_multiplier` is set); with `ldp`, the
    /// per-round budget of each release.
    pub epsilon: Option<f64>,
    /// The `δ` of (ε, δ)-DP.
    pub delta: f64,
    /// `ldp`: the L2 (Gaussian) or L1 (Laplace) bound of a client's update (default
    /// `clipping_norm`).
    pub sensitivity: Option<f64>,
    /// `cdp`/`ddp`: the noise's standard deviation over the clipping norm (`z`).
    pub noise_multiplier: Option<f64>,
    /// The L2 bound each client's update is clipped to (`C`; the initial one with adaptive
    /// clipping); default `max_grad_norm`, else 1.
    pub clipping_norm: Option<f64>,
    /// Adaptive clipping (Andrew et al. 2021): `C` follows a quantile of the update norms.
    pub adaptive_clipping: bool,
    /// Adaptive clipping: the quantile of update norms `C` tracks.
    pub target_unclipped_quantile: f64,
    /// Adaptive clipping: the geometric learning rate of `C`.
    pub clip_learning_rate: f64,
    /// Stop training before the spent ε passes this budget (the model so far is saved): a
    /// number, or `true` for `epsilon` (FedML's examples write the switch `false`).
    pub stop_training_at_epsilon: Option<EpsilonStop>,
    /// FedML's switch for its accountant: fedmq's RDP accountant always runs with `cdp`/`ddp`.
    pub enable_rdp_accountant: bool,
    /// FedML's per-sample gradient clipping bound (read as `clipping_norm` when that is unset).
    pub max_grad_norm: Option<f64>,
}

impl Default for DpArgs {
    fn default() -> Self {
        Self {
            enable_dp: false,
            dp_solution_type: "cdp".into(),
            mechanism_type: "gaussian".into(),
            epsilon: None,
            delta: 1e-5,
            sensitivity: None,
            noise_multiplier: None,
            clipping_norm: None,
            adaptive_clipping: false,
            target_unclipped_quantile: 0.5,
            clip_learning_rate: 0.2,
            stop_training_at_epsilon: None,
            enable_rdp_accountant: true,
            max_grad_norm: None,
        }
    }
}

/// `dp_args.stop_training_at_epsilon`: a budget, or FedML's switch.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum EpsilonStop {
    /// `true`: stop at `epsilon`; `false`: run every round.
    Switch(bool),
    /// Stop before the spent ε passes this.
    Budget(f64),
}

impl DpArgs {
    /// The budget the run stops at, if any: `stop_training_at_epsilon` (or `epsilon` for
    /// `true`).
    ///
    /// # Errors
    /// `true` without `epsilon`.
    pub fn stop_budget(&self) -> Result<Option<f64>, String> {
        match self.stop_training_at_epsilon {
            None | Some(EpsilonStop::Switch(false)) => Ok(None),
            Some(EpsilonStop::Budget(b)) => Ok(Some(b)),
            Some(EpsilonStop::Switch(true)) => self.epsilon.map(Some).ok_or_else(|| {
                "dp_args.stop_training_at_epsilon: true stops at epsilon, which is not set; set \
                 epsilon or give the budget as a number"
                    .to_string()
            }),
        }
    }

    /// The clipping norm `C`: `clipping_norm`, else FedML's `max_grad_norm`, else 1.
    pub fn clip(&self) -> f64 {
        self.clipping_norm.or(self.max_grad_norm).unwrap_or(1.0)
    }
}
