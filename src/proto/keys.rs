//! The blob key scheme: run- and round-scoped keys under a prefix.
//!
//! ```text
//! <prefix>/<run>/r<round>/global            global model sent to clients for round <round>
//! <prefix>/<run>/r<round>/updates/<client>  a client's update for round <round> (masked input
//!                                           when the round is securely aggregated)
//! <prefix>/<run>/r<round>/shares/<client>   its encrypted share bundle (secure aggregation)
//! <prefix>/<run>/r<round>/inbox/<client>    the shares sent to it, gathered by the server
//! <prefix>/<run>/checkpoint/r<round>        server checkpoint after round <round>
//! <prefix>/<run>/checkpoint-state/r<round>  its strategy's tensors (server-optimizer moments)
//! <prefix>/<run>/final                      the final model
//! ```
//! Rounds are zero-padded to 6 digits so keys list in round order; deleting old rounds by policy is
//! a prefix delete of `<prefix>/<run>/r<round>/`.

/// Key builder for one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobKeys {
    base: String,
    run: String,
}

impl BlobKeys {
    /// Keys of run `run` under `prefix` (may be empty). Both must be valid ids or empty prefix.
    pub fn new(prefix: &str, run: &str) -> Self {
        let base = if prefix.is_empty() {
            run.to_string()
        } else {
            format!("{}/{run}", prefix.trim_end_matches('/'))
        };
        Self {
            base,
            run: run.to_string(),
        }
    }

    /// The run id.
    pub fn run_id(&self) -> &str {
        &self.run
    }

    /// Everything of the run.
    pub fn run_prefix(&self) -> String {
        format!("{}/", self.base)
    }

    /// The server's checkpoints.
    pub fn checkpoint_prefix(&self) -> String {
        format!("{}/checkpoint/", self.base)
    }

    /// Everything of one round (global model and updates).
    pub fn round_prefix(&self, round: u64) -> String {
        format!("{}/r{round:06}/", self.base)
    }

    /// The global model of a round.
    pub fn global(&self, round: u64) -> String {
        format!("{}global", self.round_prefix(round))
    }

    /// A client's update in a round.
    pub fn update(&self, round: u64, client: &str) -> String {
        format!("{}updates/{client}", self.round_prefix(round))
    }

    /// A client's share bundle in a securely aggregated round (its masked input is its
    /// [`BlobKeys::update`]).
    pub fn shares(&self, round: u64, client: &str) -> String {
        format!("{}shares/{client}", self.round_prefix(round))
    }

    /// A client's inbox in a securely aggregated round: its share from each neighbour that
    /// shared, gathered by the server.
    pub fn inbox(&self, round: u64, client: &str) -> String {
        format!("{}inbox/{client}", self.round_prefix(round))
    }

    /// A client's aggregate mask share in a LightSecAgg round: the sum of the coded mask shares
    /// it holds from the survivors.
    pub fn reveal(&self, round: u64, client: &str) -> String {
        format!("{}reveal/{client}", self.round_prefix(round))
    }

    /// The server checkpoint written after a round.
    pub fn checkpoint(&self, round: u64) -> String {
        format!("{}/checkpoint/r{round:06}", self.base)
    }

    /// The strategy tensors of the checkpoint after `round` (kept apart from `checkpoint/`,
    /// whose newest key is the newest checkpoint).
    pub fn checkpoint_state(&self, round: u64) -> String {
        format!("{}/checkpoint-state/r{round:06}", self.base)
    }

    /// The final model.
    pub fn final_model(&self) -> String {
        format!("{}/final", self.base)
    }

    /// The round a key belongs to, if it is a round-scoped key of this run.
    pub fn round_of(&self, key: &str) -> Option<u64> {
        let rest = key.strip_prefix(&self.base)?.strip_prefix("/r")?;
        let (digits, _) = rest.split_once('/')?;
        if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_scoped_and_parse_back() {
        let k = BlobKeys::new("models", "run-1");
        assert_eq!(k.global(3), "models/run-1/r000003/global");
        assert_eq!(k.update(3, "c7"), "models/run-1/r000003/updates/c7");
        assert_eq!(k.round_of(&k.update(12, "c7")), Some(12));
        assert_eq!(k.round_of(&k.checkpoint(12)), None);
        assert!(k.checkpoint(12).starts_with(&k.checkpoint_prefix()));
        assert_eq!(k.round_of("models/run-2/r000003/global"), None);
        assert_eq!(BlobKeys::new("", "r").global(0), "r/r000000/global");
    }
}
