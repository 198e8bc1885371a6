//! The hash chain: how a record is sealed into its line, and how a line is checked.
//!
//! A line is the record's JSON without its hash (`{"seq":…,"prev":"…"}`) with
//! `,"hash":"<sha256>"` spliced in before the closing brace, where the hash is
//! SHA-256(prev ‖ "\n" ‖ the JSON without its hash). Checking works on the line's own bytes,
//! not on a re-serialisation of what a parser understood: an added, removed or reordered key,
//! or a changed number format, breaks the hash, and records written by other versions of
//! Nightingale (with more or fewer fields) verify as long as their bytes are untouched.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AuditEvent;

/// The `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A record as written, without its hash.
#[derive(Serialize)]
struct Unsealed<'a> {
    seq: u64,
    unix_ms: u64,
    #[serde(flatten)]
    event: &'a AuditEvent,
    prev: &'a str,
}

/// One record sealed into its line (no trailing newline).
#[derive(Debug, Clone)]
pub struct Sealed {
    pub seq: u64,
    pub hash: String,
    pub line: String,
}

/// Where a chain continues from: the last record's sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tail {
    pub seq: u64,
    pub hash: String,
}

impl Tail {
    /// The sequence number and `prev` of the record that follows `tail`.
    pub fn next(tail: Option<&Tail>) -> (u64, String) {
        match tail {
            Some(t) => (t.seq + 1, t.hash.clone()),
            None => (0, GENESIS.to_owned()),
        }
    }
}

fn chain_hash(prev: &str, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(body);
    hex::encode(h.finalize())
}

/// Seals events after `tail`, one record each, all with the same time.
pub fn seal(tail: Option<&Tail>, events: &[&AuditEvent], unix_ms: u64) -> Vec<Sealed> {
    let (mut seq, mut prev) = Tail::next(tail);
    let mut out = Vec::with_capacity(events.len());
    for event in events {
        let body = serde_json::to_string(&Unsealed {
            seq,
            unix_ms,
            event,
            prev: &prev,
        })
        .expect("audit records serialise");
        let hash = chain_hash(&prev, body.as_bytes());
        let mut line = body;
        line.pop(); // the closing brace
        line.push_str(",\"hash\":\"");
        line.push_str(&hash);
        line.push_str("\"}");
        out.push(Sealed {
            seq,
            hash: hash.clone(),
            line,
        });
        seq += 1;
        prev = hash;
    }
    out
}

/// The chain fields every record has, whatever else it carries.
#[derive(Deserialize)]
struct Links {
    seq: u64,
    prev: String,
    hash: String,
}

/// Checks one line against its own hash; returns its sequence number, `prev` and hash.
pub fn check_line(line: &str) -> Result<(u64, String, String), String> {
    let links: Links =
        serde_json::from_str(line).map_err(|e| format!("not an audit record ({e})"))?;
    if links.hash.len() != 64 || !links.hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("its hash is not a SHA-256 digest".into());
    }
    let suffix = format!(",\"hash\":\"{}\"}}", links.hash);
    let Some(body) = line.strip_suffix(&suffix) else {
        return Err("its hash is not the record's last field".into());
    };
    let mut body = body.to_owned();
    body.push('}');
    if chain_hash(&links.prev, body.as_bytes()) != links.hash {
        return Err("its hash does not match the record".into());
    }
    Ok((links.seq, links.prev, links.hash))
}

/// Walks a chain record by record: each line must match its hash, follow the previous
/// record's hash and carry the next sequence number.
#[derive(Debug)]
pub struct ChainChecker {
    /// The expected `(seq, prev)` of the next record; `None` before the first record of a
    /// chain that does not start at the genesis (a rotated file checked on its own).
    expect: Option<(u64, String)>,
    pub first_seq: Option<u64>,
    pub records: u64,
    pub tail: Option<Tail>,
    /// A sequence number whose record's hash is kept (an anchor's), and that record.
    pub watch: Option<u64>,
    pub watched: Option<Tail>,
}

impl ChainChecker {
    /// A chain that starts at the genesis record.
    pub fn from_genesis() -> Self {
        ChainChecker {
            expect: Some((0, GENESIS.to_owned())),
            first_seq: None,
            records: 0,
            tail: None,
            watch: None,
            watched: None,
        }
    }

    /// A chain checked from wherever its first record says it starts.
    pub fn anywhere() -> Self {
        ChainChecker {
            expect: None,
            ..Self::from_genesis()
        }
    }

    /// Checks the next line; the error says why it breaks the chain.
    pub fn push(&mut self, line: &str) -> Result<(), String> {
        let (seq, prev, hash) = check_line(line)?;
        if let Some((want_seq, want_prev)) = &self.expect {
            if seq != *want_seq {
                return Err(format!("sequence {seq} where {want_seq} was expected"));
            }
            if prev != *want_prev {
                return Err("prev does not match the previous record's hash".into());
            }
        }
        self.first_seq.get_or_insert(seq);
        self.records += 1;
        if self.watch == Some(seq) {
            self.watched = Some(Tail {
                seq,
                hash: hash.clone(),
            });
        }
        self.expect = Some((seq + 1, hash.clone()));
        self.tail = Some(Tail { seq, hash });
        Ok(())
    }
}
