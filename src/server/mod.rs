//! The server: the round engine (a sans-IO state machine) and its async driver.
//!
//! # Layout
//! - `machine.rs`: [`RoundMachine`], the round engine as `(event, now) -> actions`.
//! - `driver.rs`: [`run_server`], the async driver: MQTT, the store, timers, evaluation and
//!   metrics around the machine.
//! - `admission.rs`: which incoming messages reach the machine (decoding, per-sender budgets,
//!   signatures, duplicates).
//! - `budget.rs`: [`budget::SenderBudget`], the token bucket per sender used by admission.
//! - `checkpoint.rs`: [`Checkpoint`], writing one per closed round and reading the latest back
//!   ([`latest_checkpoint`], [`load_checkpoint_model`]) for `--resume`.

mod admission;
pub mod budget;
pub mod checkpoint;
pub mod driver;
pub mod machine;

pub use checkpoint::{latest_checkpoint, load_checkpoint_model, Checkpoint};
pub use driver::{
    run_server, run_site_server, Evaluation, Evaluator, Progress, ServerError, ServerOptions,
    ServerReport, SiteCommand, SiteLink, SiteRound, SERVER_ID,
};
pub use machine::{
    Action, Event, OnFailure, Outcome, Protocol, RoundConfig, RoundMachine, RoundSummary,
    SecureConfig, SecureMessage, Weighting,
};
