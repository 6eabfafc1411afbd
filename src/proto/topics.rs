//! The topic scheme. Every topic of a run lives under `fedmq/v1/<run>/`:
//!
//! | topic | direction | retained | payload |
//! |---|---|---|---|
//! | `fedmq/v1/<run>/status/<participant>` | participant → all | yes | `status` (online / offline; the last will is the offline one) |
//! | `fedmq/v1/<run>/cmd/<client>` | server → one client | yes (latest command; see docs/PROTOCOL.md, "MQTT session") | `train`, `finish` |
//! | `fedmq/v1/<run>/up/<client>` | client → server | no | `update`, `failure` |
//!
//! Per-participant topics let a broker ACL pin each client to its own `up/` and `status/` topics.

use super::valid_id;

/// Topic builder for one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    root: String,
    run: String,
}

/// What a received topic is, parsed back from its string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicKind {
    /// `status/<participant>`
    Status(String),
    /// `cmd/<client>`
    Command(String),
    /// `up/<client>`
    Up(String),
}

impl Topics {
    /// Topics of run `run`. `run` must satisfy [`valid_id`]; callers validate config first.
    pub fn new(run: &str) -> Self {
        Self {
            root: format!("fedmq/v1/{run}"),
            run: run.to_string(),
        }
    }

    /// The MQTT client id of `participant` in this run: `fedmq-<run>-<participant>`. It keys the
    /// broker's persistent session, so it is unique per run and participant: two runs on one
    /// broker never take over each other's connections.
    pub fn mqtt_client_id(&self, participant: &str) -> String {
        format!("fedmq-{}-{participant}", self.run)
    }

    /// Retained presence of a participant (server or client).
    pub fn status(&self, participant: &str) -> String {
        format!("{}/status/{participant}", self.root)
    }

    /// Filter matching every participant's presence.
    pub fn status_all(&self) -> String {
        format!("{}/status/+", self.root)
    }

    /// Commands to one client.
    pub fn command(&self, client: &str) -> String {
        format!("{}/cmd/{client}", self.root)
    }

    /// Messages from one client to the server.
    pub fn up(&self, client: &str) -> String {
        format!("{}/up/{client}", self.root)
    }

    /// Filter matching every client's messages to the server.
    pub fn up_all(&self) -> String {
        format!("{}/up/+", self.root)
    }

    /// Parses a concrete topic of this run; `None` for anything else.
    pub fn parse(&self, topic: &str) -> Option<TopicKind> {
        let rest = topic.strip_prefix(&self.root)?.strip_prefix('/')?;
        let (kind, id) = rest.split_once('/')?;
        if !valid_id(id) {
            return None;
        }
        let id = id.to_string();
        match kind {
            "status" => Some(TopicKind::Status(id)),
            "cmd" => Some(TopicKind::Command(id)),
            "up" => Some(TopicKind::Up(id)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_parse_round_trip() {
        let t = Topics::new("run-1");
        assert_eq!(t.status("client-3"), "fedmq/v1/run-1/status/client-3");
        assert_eq!(
            t.parse(&t.status("server")),
            Some(TopicKind::Status("server".into()))
        );
        assert_eq!(
            t.parse(&t.command("c1")),
            Some(TopicKind::Command("c1".into()))
        );
        assert_eq!(t.parse(&t.up("c1")), Some(TopicKind::Up("c1".into())));
        assert_eq!(t.up_all(), "fedmq/v1/run-1/up/+");
    }

    #[test]
    fn foreign_and_malformed_topics_are_none() {
        let t = Topics::new("run-1");
        for bad in [
            "fedmq/v1/run-2/up/c1",
            "fedmq/v1/run-1/up/c1/extra",
            "fedmq/v1/run-1/up/",
            "fedmq/v1/run-1/what/c1",
            "fedmq/v1/run-1",
            "",
        ] {
            assert_eq!(t.parse(bad), None, "{bad}");
        }
    }
}
