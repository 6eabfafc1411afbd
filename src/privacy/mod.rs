//! Differential privacy's bookkeeping: how much privacy a run has spent.
//!
//! # Layout
//! - `accountant.rs`: the RDP accountant of the sampled Gaussian mechanism ([`RdpAccountant`],
//!   [`rdp_sampled_gaussian`], [`epsilon`]) and the noise a budget allows
//!   ([`noise_multiplier_for`]). Checked against Google's `dp_accounting` on a grid of sampling
//!   rates, noise multipliers, steps and δ (`tests/data/rdp_vectors.json`, made by
//!   `scripts/rdp_vectors.py`).
//!
//! The mechanisms themselves (clipping, noise, where each is added) are in
//! `crate::strategy::Private` (server) and `crate::client::hooks::privatize` (client).

pub mod accountant;

pub use accountant::{
    epsilon, noise_multiplier_for, rdp_sampled_gaussian, RdpAccountant, DEFAULT_ORDERS,
};
