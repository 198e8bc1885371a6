//! PostgreSQL store, for replicas that share one audit trail. The table holds one row per
//! record with the record's line verbatim. Each group is one transaction that takes the
//! table's write lock (`LOCK TABLE … IN EXCLUSIVE MODE`: readers go on, writers queue), reads
//! and checks the chain's tail, and inserts: replicas append to one chain in turn, and a failed
//! write rolls the whole group back. A lost connection is re-opened before the next group.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

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

/// What a connection string names, for logs and errors: host(s), port(s), user and database,
/// read by the client library's own parser (so every spelling it accepts — URL, `key=value`
/// with spaces around `=`, quoted values, URL-encoded passwords, `?password=` — is handled
/// alike). Nothing of the configured text is echoed: a string the parser refuses is shown as
/// `<unparseable connection string>`.
pub fn redact(url: &str) -> String {
    use ::postgres::config::Host;
    let Ok(config) = url.parse::<::postgres::Config>() else {
        return "<unparseable connection string>".into();
    };
    let mut parts = vec![];
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    if !hosts.is_empty() {
        parts.push(format!("host={}", hosts.join(",")));
    }
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    if !ports.is_empty() {
        parts.push(format!("port={}", ports.join(",")));
    }
    if let Some(user) = config.get_user() {
        parts.push(format!("user={user}"));
    }
    if let Some(dbname) = config.get_dbname() {
        parts.push(format!("dbname={dbname}"));
    }
    if parts.is_empty() {
        "<connection string with no host, port, user or dbname>".into()
    } else {
        parts.join(" ")
    }
}

/// How long a connection may take, the server's answer to the start-up handshake and the
/// schema statement included.
const CONNECT_WITHIN: Duration = Duration::from_secs(15);

/// Connection attempts still waiting for a server that accepted them and has not answered
/// (each on a thread of its own, which ends when the server answers or the connection dies).
static PENDING_CONNECTS: AtomicUsize = AtomicUsize::new(0);

/// At most this many such attempts wait at once: another is refused until one ends.
const MAX_PENDING_CONNECTS: usize = 2;

fn connect(url: &str, location: &str) -> Result<Client, AuditError> {
    connect_within(url, location, CONNECT_WITHIN, true)
}

/// Connects and (with `schema`) creates the table if needed, within `limit`. The client
/// library bounds only the TCP connection: a server that accepts and never answers its start-up handshake (a
/// frozen PostgreSQL, a proxy whose database is gone) held `serve` at its start for as long
/// as it stayed silent (a review's finding). The attempt runs on a thread of its own, left
/// to end by itself when it takes longer than `limit`.
fn connect_within(
    url: &str,
    location: &str,
    limit: Duration,
    schema: bool,
) -> Result<Client, AuditError> {
    let config = config(url, location)?;
    let slow = |reason: String| AuditError::Write {
        location: location.to_owned(),
        reason,
    };
    if PENDING_CONNECTS.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING_CONNECTS {
        PENDING_CONNECTS.fetch_sub(1, Ordering::SeqCst);
        return Err(slow(
            "earlier connection attempts are still waiting for the server to answer".into(),
        ));
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new()
        .name("audit-pg-connect".into())
        .spawn(move || {
            let result = config.connect(NoTls).and_then(|mut client| {
                if schema {
                    client.batch_execute(SCHEMA)?;
                }
                Ok(client)
            });
            PENDING_CONNECTS.fetch_sub(1, Ordering::SeqCst);
            // The caller may have given up: the client is then dropped here.
            let _ = tx.send(result);
        });
    if let Err(e) = spawned {
        PENDING_CONNECTS.fetch_sub(1, Ordering::SeqCst);
        return Err(slow(format!("cannot start a connection thread: {e}")));
    }
    match rx.recv_timeout(limit) {
        Ok(result) => result.map_err(|source| AuditError::Postgres {
            location: location.to_owned(),
            source,
        }),
        Err(RecvTimeoutError::Timeout) => Err(slow(format!(
            "the server did not complete the connection within {} s (it accepted the \
             connection and has not answered)",
            limit.as_secs_f64()
        ))),
        Err(RecvTimeoutError::Disconnected) => {
            Err(slow("the connection attempt ended without a result".into()))
        }
    }
}

/// The connection settings of `url`, with the timeouts below where it sets none.
fn config(url: &str, location: &str) -> Result<::postgres::Config, AuditError> {
    let err = |source| AuditError::Postgres {
        location: location.to_owned(),
        source,
    };
    let mut config: ::postgres::Config = url.parse().map_err(err)?;
    // A server that stops answering (a host gone, a network cut) fails a write within
    // seconds instead of holding the writer for the kernel's ~15 minutes of retransmissions:
    // the trail is then failing, readiness 503, and DICOM records are held (a review's
    // finding: a frozen server hung every C-STORE, readiness 200). Set in the URL to change.
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(std::time::Duration::from_secs(30));
    }
    if config.get_keepalives_idle() == std::time::Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(std::time::Duration::from_secs(30));
    }
    Ok(config)
}

impl PostgresStore {
    /// Connects, creates the table if needed and checks the record the chain continues from.
    /// Must not be called on an async runtime thread (the client blocks).
    pub fn open(url: &str) -> Result<Self, AuditError> {
        let location = redact(url);
        // Before connecting, so that a slow server's wait is seen in the log.
        tracing::info!(store = %location, "connecting to the PostgreSQL audit store");
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

    fn check(&mut self) -> Result<(), AuditError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            self.client = Some(connect(&self.url, &self.location)?);
        }
        let client = self.client.as_mut().expect("connected");
        if let Err(source) = client.simple_query("SELECT 1") {
            self.client = None;
            return Err(AuditError::Postgres {
                location: self.location.clone(),
                source,
            });
        }
        Ok(())
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
    let mut client = connect_within(url, &location, CONNECT_WITHIN, false)?;
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
        file_starts: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::{connect_within, redact};

    /// A server that accepts the connection and never answers the start-up handshake fails
    /// the connection within its limit, with a reason (it held `serve` at its start).
    #[test]
    fn a_server_that_accepts_and_never_answers_fails_the_connection_in_time() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let silent = std::thread::spawn(move || {
            // Holds the connection open, reads nothing and answers nothing, until the test
            // has its answer (at most 60 s).
            let (held, _) = listener.accept().unwrap();
            let _ = wait.recv_timeout(std::time::Duration::from_secs(60));
            drop(held);
        });
        let url = format!("host=127.0.0.1 port={port} user=ng password=S3cretPW dbname=audit");
        let err = connect_within(
            &url,
            &redact(&url),
            std::time::Duration::from_millis(500),
            true,
        )
        .map(|_| ())
        .unwrap_err()
        .to_string();
        done.send(()).unwrap();
        // Timed out, not ended by the server closing the connection.
        assert!(err.contains("did not complete the connection"), "{err}");
        assert!(!err.contains("S3cret"), "{err}");
        silent.join().unwrap();
    }

    #[test]
    fn the_password_is_never_shown_whatever_its_spelling() {
        let cases = [
            // URL forms.
            (
                "postgres://ng:S3cretPW@db.example:5433/audit",
                "host=db.example port=5433 user=ng dbname=audit",
            ),
            (
                "postgresql://nightingale@127.0.0.1:19499/audit?password=S3cretPW",
                "host=127.0.0.1 port=19499 user=nightingale dbname=audit",
            ),
            (
                "postgresql://ng:S3cret%40PW%3A%2F@db/audit",
                "host=db port=5432 user=ng dbname=audit",
            ),
            (
                "postgresql://ng@db/audit?password=S3cret%20PW&sslmode=disable",
                "host=db port=5432 user=ng dbname=audit",
            ),
            (
                "postgres://ng:S3cretPW@h1:5432,h2:5433/audit",
                "host=h1,h2 port=5432,5433 user=ng dbname=audit",
            ),
            // key=value forms.
            (
                "host=127.0.0.1 port=19499 user=ng password=S3cretPW dbname=audit",
                "host=127.0.0.1 port=19499 user=ng dbname=audit",
            ),
            (
                "host=127.0.0.1 port=19499 user=ng password = S3cretPW",
                "host=127.0.0.1 port=19499 user=ng",
            ),
            (
                "host=127.0.0.1 port=19499 user=ng password='pass S3cretPW'",
                "host=127.0.0.1 port=19499 user=ng",
            ),
            (
                r"host=db user=ng PASSWORD=S3cretPW password='it\'s S3cretPW' dbname=audit",
                "<unparseable connection string>",
            ),
            (
                r"host=db user=ng password='it\'s S3cretPW' dbname=audit",
                "host=db user=ng dbname=audit",
            ),
            (
                "host=/var/run/postgresql user=ng password=S3cretPW",
                "host=/var/run/postgresql user=ng",
            ),
            // What the parser refuses is not echoed at all.
            (
                "host=db password='S3cretPW unterminated",
                "<unparseable connection string>",
            ),
            (
                "postgres://ng:S3cretPW@db:notaport/audit",
                "<unparseable connection string>",
            ),
            ("S3cretPW", "<unparseable connection string>"),
        ];
        for (url, want) in cases {
            let shown = redact(url);
            assert!(!shown.contains("S3cret"), "{url:?} -> {shown:?}");
            assert_eq!(shown, want, "{url:?}");
        }
    }
}
