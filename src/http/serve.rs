//! The plaintext HTTP accept loop (HTTP/1.1, or HTTP/2 with prior knowledge: gRPC's h2c),
//! with the connection limits `axum::serve` does not have: a deadline on a request's headers
//! (a client that trickles a header line every few seconds, or connects and sends nothing,
//! is closed instead of holding a descriptor and ~60 KB for ever), HTTP/2 keep-alive pings
//! (a dead peer's connection is closed), and a cap on open connections (beyond it the
//! listener is not polled: new connections wait in the kernel's backlog, the ones open are
//! served), and a cap on the connections of one client ([`super::clients`]). A request's own deadline, once its headers are in, is the API's
//! ([`crate::http::HttpConfig`]).

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

/// Limits of the connections of one listener.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Time a client has to send a request's headers, from the moment the connection waits
    /// for them (a new connection, or a kept-alive one between requests).
    pub header_read_timeout: Duration,
    /// Connections open at once; beyond, new ones wait in the backlog.
    pub max_connections: usize,
    /// Connections one client may hold open at once; beyond, a new one is closed at once
    /// ([`super::clients`]).
    pub max_per_client: usize,
    /// HTTP/2: a PING after this much silence; the connection is closed when its answer
    /// does not come within the same time. It also bounds a header block left unfinished
    /// (HEADERS without END_HEADERS, then nothing: no PING can be answered inside it), which
    /// no request deadline sees: by default half the header deadline, so such a connection
    /// goes within about [`HEADER_READ_TIMEOUT`], as an HTTP/1 one with half its headers
    /// does (at 60 s a red-team pass held 420 KB of header block per connection, before
    /// any authentication, for 135-148 s).
    pub http2_keep_alive: Duration,
    /// On shutdown: how long open connections get to finish their requests.
    pub shutdown_grace: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/2 ones above
    /// all, which the header deadline does not bound: [`super::idle`]).
    pub idle_timeout: Duration,
    /// TCP_NODELAY on accepted connections.
    pub nodelay: bool,
    /// A response the client takes nothing of for this long is dropped
    /// ([`super::idle::SEND_STALL_TIMEOUT`] by default; `serve` makes it no longer than the
    /// request deadline).
    pub send_stall: Duration,
}

impl ConnectionLimits {
    /// Sets the header deadline and the HTTP/2 keep-alive on `builder` (this loop's, and
    /// axum-server's for the TLS listener).
    pub fn configure(&self, builder: &mut auto::Builder<TokioExecutor>) {
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            // A client that sends its whole request and shuts its side down (`nc -N`, an
            // HTTP/1.0 script) still gets its answer: the request was dropped unanswered,
            // unrun and unaudited (a red-team finding).
            .half_close(true)
            // Header fields per request (hyper's default is 100: a request through proxies
            // that add tracing headers got an empty 431, a red-team finding).
            .max_headers(MAX_HEADER_FIELDS);
        builder
            .http2()
            .timer(TokioTimer::new())
            // The header block budget of HTTP/1 (256 fields of up to ~1.5 KiB): at hyper's
            // 16 KiB, one gRPC call with large metadata got a bare 431, or above 64 KiB a
            // GOAWAY that failed every other call on the connection (a red-team finding).
            .max_header_list_size(MAX_HTTP2_HEADER_LIST)
            .keep_alive_interval(Some(self.http2_keep_alive))
            .keep_alive_timeout(self.http2_keep_alive);
    }
}

/// The largest HTTP/2 header list (HPACK-decoded, RFC 9113's SETTINGS_MAX_HEADER_LIST_SIZE)
/// a request may carry.
pub const MAX_HTTP2_HEADER_LIST: u32 = 400 << 10;

/// Most header fields one HTTP/1 request may carry (beyond: 431).
pub const MAX_HEADER_FIELDS: usize = 256;

/// Default [`ConnectionLimits::idle_timeout`]: five minutes, as long as a gRPC client's
/// channel usually stays useful between calls without being a way to hold connections.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a connection may take to send a request's headers, and to send its first byte
/// (plaintext; TLS: after the handshake).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_connections: 4096,
            max_per_client: super::clients::DEFAULT_MAX_PER_CLIENT,
            http2_keep_alive: HEADER_READ_TIMEOUT / 2,
            shutdown_grace: Duration::from_secs(30),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            nodelay: false,
            send_stall: super::idle::SEND_STALL_TIMEOUT,
        }
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves `app` on `listener` until `shutdown` resolves, then lets open connections finish
/// (within [`ConnectionLimits::shutdown_grace`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let clients = super::clients::ClientCounts::new(limits.max_per_client);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    limits.configure(&mut builder);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(slot) = clients.admit(peer.ip()) else {
            super::clients::refused("plaintext", &clients);
            drop(tcp);
            continue;
        };
        if limits.nodelay {
            let _ = tcp.set_nodelay(true);
        }
        let builder = builder.clone();
        let activity = super::idle::Activity::holding(Some(slot));
        let service = hyper_util::service::TowerToHyperService::new(
            super::idle::Tracked::new(app.clone(), activity.clone())
                .with_stall_timeout(limits.send_stall),
        );
        let send_stall = limits.send_stall;
        let idle_timeout = limits.idle_timeout;
        let watcher = graceful.watcher();
        let first_byte = limits.header_read_timeout;
        tokio::spawn(async move {
            // hyper's header deadline starts with the first byte, and the protocol detection
            // before it reads without one: a connection that sends nothing, or only part of
            // the HTTP/2 preface (held for the 300 s idle timeout: a red-team finding), is
            // ended by the first-byte deadline, as on the TLS listener.
            let io = super::idle::IdleClose::new(tcp, activity, idle_timeout)
                .with_first_byte_deadline(first_byte)
                .with_write_stall(send_stall);
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            if let Err(e) = watcher.watch(connection.into_owned()).await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = limits.shutdown_grace.as_secs(),
            "connections still open after the shutdown grace: closing"
        );
    }
    Ok(())
}
