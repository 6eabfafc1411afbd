//! The server: the round engine (sans-IO state machine) and, later, its async driver.

pub mod machine;

pub use machine::{Action, Event, Outcome, RoundConfig, RoundMachine, RoundSummary};
