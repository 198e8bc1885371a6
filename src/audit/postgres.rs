//! PostgreSQL store, for replicas that share one audit trail. The table holds one row per
//! record with the record's line verbatim. Each group is one transaction that takes the
//! table's write lock (`LOCK TABLE … IN EXCLUSIVE MODE`: readers go on, writers queue), reads
//! and checks the chain's tail, and inserts: replicas append to one chain in turn, and a failed
//! write rolls the whole group back. A lost connection is re-opened before the next group.

use ::postgres::{Client, NoTls};

use super::chain::{ChainChecker, seal};
use super::{AuditError, AuditEvent, AuditStore, ChainSummary, checked_tail};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS nightingale_audit (
    seq BIGINT PRIMARY KEY,
    hash TEXT NOT NULL,
    record TEXT NOT NULL
)";

/// A PostgreSQL audit table.
pub struct PostgresStore {
    url: String,
    client: Option<Client>,
    location: String,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

/// The connection string without its password, for logs and errors.
pub fn redact(url: &str) -> String {
    // URL form: postgres://user:password@host/db
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, host)) = rest.split_once('@')
    {
        let user = userinfo.split(':').next().unwrap_or_default();
        return format!("{scheme}://{user}@{host}");
    }
    // key=value form: drop password=…
    url.split_whitespace()
        .filter(|kv| !kv.to_ascii_lowercase().starts_with("password="))
        .collect::<Vec<_>>()
        .join(" ")
}

fn connect(url: &str, location: &str) -> Result<Client, AuditError> {
    let err = |source| AuditError::Postgres {
        location: location.to_owned(),
        source,
    };
    let mut client = Client::connect(url, NoTls).map_err(err)?;
    client.batch_execute(SCHEMA).map_err(err)?;
    Ok(client)
}

impl PostgresStore {
    /// Connects, creates the table if needed and checks the record the chain continues from.
    /// Must not be called on an async runtime thread (the client blocks).
    pub fn open(url: &str) -> Result<Self, AuditError> {
        let location = redact(url);
        let mut client = connect(url, &location)?;
        tail(&mut client, &location)?;
        Ok(PostgresStore {
            url: url.to_owned(),
            client: Some(client),
            location,
        })
    }
}

fn tail(
    client: &mut impl ::postgres::GenericClient,
    location: &str,
) -> Result<Option<super::Tail>, AuditError> {
    let row = client
        .query_opt(
            "SELECT seq, record FROM nightingale_audit ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .map_err(|source| AuditError::Postgres {
            location: location.to_owned(),
            source,
        })?;
    checked_tail(
        location,
        row.map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1))),
    )
}

impl AuditStore for PostgresStore {
    fn append(&mut self, events: &[&AuditEvent], unix_ms: u64) -> Result<(), AuditError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            self.client = Some(connect(&self.url, &self.location)?);
        }
        let client = self.client.as_mut().expect("connected");
        let result = append_group(client, &self.location, events, unix_ms);
        if result.is_err() {
            // The connection may be gone (a restarted server notices only now): the next
            // group starts on a fresh one. Nothing of this group was committed, unless the
            // connection broke during COMMIT itself, which PostgreSQL cannot tell us.
            self.client = None;
        }
        result
    }

    fn describe(&self) -> String {
        format!("PostgreSQL {}", self.location)
    }
}

fn append_group(
    client: &mut Client,
    location: &str,
    events: &[&AuditEvent],
    unix_ms: u64,
) -> Result<(), AuditError> {
    let err = |source| AuditError::Postgres {
        location: location.to_owned(),
        source,
    };
    let mut tx = client.transaction().map_err(err)?;
    tx.batch_execute("LOCK TABLE nightingale_audit IN EXCLUSIVE MODE")
        .map_err(err)?;
    let tail = tail(&mut tx, location)?;
    let insert = tx
        .prepare("INSERT INTO nightingale_audit (seq, hash, record) VALUES ($1, $2, $3)")
        .map_err(err)?;
    for s in seal(tail.as_ref(), events, unix_ms) {
        let seq = i64::try_from(s.seq).map_err(|_| AuditError::Write {
            location: location.to_owned(),
            reason: "sequence number overflow".into(),
        })?;
        tx.execute(&insert, &[&seq, &s.hash, &s.line])
            .map_err(err)?;
    }
    tx.commit().map_err(err)
}

/// Checks every record of the PostgreSQL audit table in sequence order.
pub fn verify(url: &str) -> Result<ChainSummary, AuditError> {
    verify_watching(url, None)
}

/// [`verify`], also keeping the record at sequence number `watch`.
pub fn verify_watching(url: &str, watch: Option<u64>) -> Result<ChainSummary, AuditError> {
    let location = redact(url);
    let err = |source| AuditError::Postgres {
        location: location.clone(),
        source,
    };
    let mut client = Client::connect(url, NoTls).map_err(err)?;
    let mut checker = ChainChecker::from_genesis();
    checker.watch = watch;
    let mut tx = client.transaction().map_err(err)?;
    let portal = tx
        .bind(
            "SELECT seq, hash, record FROM nightingale_audit ORDER BY seq",
            &[],
        )
        .map_err(err)?;
    loop {
        let rows = tx.query_portal(&portal, 10_000).map_err(err)?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            super::check_row(&location, &mut checker, row.get(0), row.get(1), row.get(2))?;
        }
    }
    Ok(ChainSummary {
        files: vec![],
        first_seq: checker.first_seq,
        records: checker.records,
        tail: checker.tail,
        watched: checker.watched,
    })
}
