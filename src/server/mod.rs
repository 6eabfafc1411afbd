//! The server: the round engine (a sans-IO state machine) and its async driver.

pub mod budget;
pub mod driver;
pub mod machine;

pub use driver::{
    latest_checkpoint, load_checkpoint_model, run_server, Checkpoint, Evaluation, Evaluator,
    Progress, ServerError, ServerOptions, ServerReport, SERVER_ID,
};
pub use machine::{Action, Event, Outcome, RoundConfig, RoundMachine, RoundSummary, Weighting};
