//! Mosquitto's ACL file (`acl_file`): which topics each user may publish to and subscribe to.

use super::framing::valid_filter;
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    access: Access,
    topic: String,
}

/// What a client asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// PUBLISH (or a will) on a topic name.
    Write,
    /// SUBSCRIBE to a filter.
    Read,
}

/// A Mosquitto ACL file: `topic [read|write|readwrite|deny] <topic>` lines before any `user`
/// line apply to anonymous clients, after `user <name>` to that user; `pattern [...] <topic>`
/// lines apply to every authenticated client, wherever they stand, with `%u` replaced by its
/// user name and `%c` by its client id. Anything not granted is refused; a matching `deny`
/// refuses even what another line grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Acl {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

impl Acl {
    /// Reads and parses an ACL file.
    ///
    /// # Errors
    /// The I/O error or the first bad line, as a message naming the file and line.
    pub(crate) fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the text of an ACL file.
    ///
    /// # Errors
    /// `line N: reason` for the first line that is not a comment, blank, `user`, `topic` or
    /// `pattern` line with a valid topic filter.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| format!("line {}: {why}: {line:?}", n + 1);
            let (keyword, rest) = line
                .split_once(char::is_whitespace)
                .map(|(k, r)| (k, r.trim()))
                .unwrap_or((line, ""));
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(bad("`user` without a name"));
                    }
                    user = Some(rest.to_string());
                    acl.users.entry(rest.to_string()).or_default();
                }
                "topic" | "pattern" => {
                    let (access, topic) = match rest.split_once(char::is_whitespace) {
                        Some(("read", t)) => (Access::Read, t.trim()),
                        Some(("write", t)) => (Access::Write, t.trim()),
                        Some(("readwrite", t)) => (Access::ReadWrite, t.trim()),
                        Some(("deny", t)) => (Access::Deny, t.trim()),
                        _ => (Access::ReadWrite, rest),
                    };
                    if !valid_filter(topic) {
                        return Err(bad("not a valid MQTT topic filter"));
                    }
                    let rule = Rule {
                        access,
                        topic: topic.to_string(),
                    };
                    if keyword == "pattern" {
                        acl.patterns.push(rule);
                    } else if let Some(u) = &user {
                        acl.users.entry(u.clone()).or_default().push(rule);
                    } else {
                        acl.anonymous.push(rule);
                    }
                }
                _ => return Err(bad("expected `user`, `topic` or `pattern`")),
            }
        }
        Ok(acl)
    }

    /// Whether any `topic` line applies to anonymous clients (the gateway admits none, so such
    /// lines grant nothing; Mosquitto applies them only with `allow_anonymous true`).
    pub(crate) fn has_anonymous_rules(&self) -> bool {
        !self.anonymous.is_empty()
    }

    /// Whether `user` (connected as `client_id`) may do `action` on `topic` (a topic name for
    /// [`Action::Write`], a filter for [`Action::Read`]: every topic the filter can match must be
    /// readable).
    ///
    /// # Errors
    /// The reason for the refusal.
    pub(crate) fn check(
        &self,
        user: &str,
        client_id: &str,
        action: Action,
        topic: &str,
    ) -> Result<(), &'static str> {
        let own = self.users.get(user).map(Vec::as_slice).unwrap_or(&[]);
        let patterns = self
            .patterns
            .iter()
            .filter_map(|r| substitute(&r.topic, user, client_id).map(|t| (r.access, t)));
        let rules: Vec<(Access, std::borrow::Cow<'_, str>)> = own
            .iter()
            .map(|r| (r.access, std::borrow::Cow::Borrowed(r.topic.as_str())))
            .chain(patterns.map(|(a, t)| (a, std::borrow::Cow::Owned(t))))
            .collect();
        let denied = rules.iter().any(|(a, t)| {
            *a == Access::Deny
                && match action {
                    Action::Write => covers(t, topic),
                    Action::Read => overlaps(t, topic),
                }
        });
        if denied {
            return Err("a deny line matches");
        }
        let granted = rules.iter().any(|(a, t)| {
            let allows = match action {
                Action::Write => matches!(a, Access::Write | Access::ReadWrite),
                Action::Read => matches!(a, Access::Read | Access::ReadWrite),
            };
            allows && covers(t, topic)
        });
        if granted {
            Ok(())
        } else {
            Err(match action {
                Action::Write => "no line grants write access",
                Action::Read => "no line grants read access to every topic the filter matches",
            })
        }
    }
}

/// A pattern with `%u` and `%c` replaced; `None` (the pattern grants nothing) when a value it
/// needs is empty or contains a wildcard, which would widen the pattern.
fn substitute(pattern: &str, user: &str, client_id: &str) -> Option<String> {
    let unsafe_value = |v: &str| v.is_empty() || v.contains(['+', '#']);
    if (pattern.contains("%u") && unsafe_value(user))
        || (pattern.contains("%c") && unsafe_value(client_id))
    {
        return None;
    }
    Some(pattern.replace("%u", user).replace("%c", client_id))
}

/// Whether ACL filter `acl` covers every topic that `filter` matches (for a topic name: whether
/// `acl` matches it). `#` covers the remaining levels (and the parent level, as in MQTT), `+`
/// any one level including a `+` of `filter`, a literal only the same literal. Wildcards at the
/// first level do not cover topics starting with `$` (MQTT 3.1.1 section 4.7.2).
pub(crate) fn covers(acl: &str, filter: &str) -> bool {
    let a: Vec<&str> = acl.split('/').collect();
    let f: Vec<&str> = filter.split('/').collect();
    if f[0].starts_with('$') && (a[0] == "+" || a[0] == "#") {
        return false;
    }
    for (i, level) in a.iter().enumerate() {
        if *level == "#" {
            return true;
        }
        let Some(other) = f.get(i) else {
            return false;
        };
        let ok = match *level {
            "+" => *other != "#",
            lit => lit == *other,
        };
        if !ok {
            return false;
        }
    }
    a.len() == f.len()
}

/// Whether two filters can match a common topic (for `deny` lines against a subscription).
pub(super) fn overlaps(x: &str, y: &str) -> bool {
    let a: Vec<&str> = x.split('/').collect();
    let b: Vec<&str> = y.split('/').collect();
    let mut i = 0;
    loop {
        match (a.get(i), b.get(i)) {
            (Some(&"#"), _) | (_, Some(&"#")) => return true,
            (None, None) => return true,
            (Some(p), Some(q)) if *p == "+" || *q == "+" || p == q => i += 1,
            _ => return false,
        }
    }
}
