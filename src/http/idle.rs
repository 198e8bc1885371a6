//! Closing connections that carry no request for a while, on both listeners.
//!
//! HTTP/1.1's header deadline closes a kept-alive connection that sends no next request, but
//! an HTTP/2 connection (gRPC's, or HTTPS with h2) that opens no stream has no such bound:
//! hyper answers its pings and keeps it for ever, so a client holding a few such connections
//! per slot could keep `--max-connections` taken. Here each connection counts its requests in
//! flight (a request is in flight from its headers until its response body is dropped, so a
//! long download is never cut), and its reads end (EOF, which hyper takes as the peer
//! closing) once it has had none in flight for [`ConnectionLimits::idle_timeout`]. Bytes the
//! peer sends without a request (pings, settings) do not count: they are what an idle HTTP/2
//! connection sends.
//!
//! [`ConnectionLimits::idle_timeout`]: super::serve::ConnectionLimits::idle_timeout

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// One connection's requests: how many are in flight, and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    inflight: AtomicUsize,
    /// Milliseconds from `start` to the last request's start or end.
    last_ms: AtomicU64,
    /// The connection's place in its client's count ([`super::clients`]), given back when
    /// the connection's stream and service are both gone.
    _slot: Option<super::clients::ClientSlot>,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Self::holding(None)
    }

    /// A connection's activity that also holds its client's slot until the connection ends.
    pub fn holding(slot: Option<super::clients::ClientSlot>) -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            inflight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            _slot: slot,
        })
    }

    /// The client of the connection (none for a connection not counted by client).
    pub fn client(&self) -> Option<std::net::IpAddr> {
        self._slot.as_ref().map(super::clients::ClientSlot::client)
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// A request begins; it ends when the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        InFlight(self.clone())
    }

    /// When the connection will have been idle for `timeout` (`None` while a request is in
    /// flight).
    fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        (self.inflight.load(Ordering::Relaxed) == 0).then(|| {
            self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + timeout
        })
    }
}

/// A request in flight on its connection (see [`Activity::begin`]).
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's stream whose reads end once its [`Activity`] has been idle for `timeout`,
/// and whose writes fail once the peer has taken nothing for [`SEND_STALL_TIMEOUT`].
///
/// The write deadline: a response handed to hyper whole (a `Full` body) has ended as far as
/// the service can see, its request's budget given back, while hyper still holds its bytes
/// for a peer that does not read; hyper reads nothing meanwhile, so the idle close never
/// fires either, and the bytes stayed in memory as long as the peer kept the connection
/// open (a red-team finding: 57 MB per connection for 340 s). A write that stays blocked
/// for the stall timeout fails, and hyper closes the connection and frees them.
pub struct IdleClose<IO> {
    io: IO,
    activity: Arc<Activity>,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    /// Until the client's protocol is known (its first byte, or the whole HTTP/2 preface
    /// when it begins as one): the connection ends this long after it began.
    first_byte: Option<Duration>,
    /// Bytes of the HTTP/2 preface read so far while [`Self::first_byte`] runs.
    preface: usize,
    write_stall: Duration,
    /// Set while a write is blocked: fires at the write deadline.
    write_blocked: Option<Pin<Box<Sleep>>>,
}

impl<IO> IdleClose<IO> {
    pub fn new(io: IO, activity: Arc<Activity>, timeout: Duration) -> Self {
        let sleep = Box::pin(tokio::time::sleep(timeout));
        IdleClose {
            io,
            activity,
            timeout,
            sleep,
            first_byte: None,
            preface: 0,
            write_stall: SEND_STALL_TIMEOUT,
            write_blocked: None,
        }
    }

    /// Another write deadline than [`SEND_STALL_TIMEOUT`] (a shorter request deadline, tests).
    pub fn with_write_stall(mut self, stall: Duration) -> Self {
        self.write_stall = stall;
        self
    }

    /// What a write's outcome becomes: ready clears the deadline; pending starts it (the
    /// first time) and fails once it has passed.
    fn written<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.write_blocked = None;
            return polled;
        }
        let stall = self.write_stall;
        let deadline = self
            .write_blocked
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        if deadline.as_mut().poll(cx).is_ready() {
            self.write_blocked = None;
            tracing::debug!(
                stall_secs = stall.as_secs(),
                "connection closed: the peer took nothing of a response for the stall timeout"
            );
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer took nothing of a response for the stall timeout",
            )));
        }
        Poll::Pending
    }

    /// Ends the connection if nothing at all has been read `limit` after it began: a TLS
    /// client that completes its handshake and sends no request was held for the whole idle
    /// timeout (300 s), where the plaintext listener closes a silent connection at its header
    /// deadline (30 s; a review's finding).
    pub fn with_first_byte_deadline(mut self, limit: Duration) -> Self {
        self.first_byte = Some(limit);
        self.sleep
            .as_mut()
            .reset(self.activity.start + limit.min(self.timeout));
        self
    }

    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Whether the connection has been idle long enough to end (registers the wake-up for
    /// when it would be, otherwise).
    fn idle_for_long(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let now = Instant::now();
            if let Some(limit) = self.first_byte {
                let at = self.activity.start + limit;
                if at <= now {
                    return true;
                }
                self.sleep.as_mut().reset(at);
                continue;
            }
            match self.activity.idle_deadline(self.timeout) {
                Some(at) if at <= now => return true,
                Some(at) => self.sleep.as_mut().reset(at),
                // Busy: looked at again a timeout from now (the end of a request touches the
                // activity, so the deadline then is at least that far).
                None => self.sleep.as_mut().reset(now + self.timeout),
            }
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for IdleClose<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                let new = &buf.filled()[before..];
                if this.first_byte.is_some() && !new.is_empty() && {
                    // Known once the bytes cannot begin the HTTP/2 preface, or hold it whole
                    // (a TLS client that sent part of it was held for the idle timeout, 300 s:
                    // a re-attack's finding; the plaintext listener peeks the same way).
                    let preface = crate::http::serve::H2_PREFACE;
                    let at = this.preface;
                    let n = new.len().min(preface.len() - at);
                    if new[..n] == preface[at..at + n] {
                        this.preface += n;
                        this.preface == preface.len()
                    } else {
                        true
                    }
                } {
                    this.first_byte = None;
                    let at = Instant::now() + this.timeout;
                    this.sleep.as_mut().reset(at);
                }
                Poll::Ready(r)
            }
            Poll::Pending if this.idle_for_long(cx) => {
                tracing::debug!(
                    idle_secs = this.timeout.as_secs(),
                    "connection closed: no request in flight for the idle timeout"
                );
                // End of stream: nothing is put in `buf`.
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for IdleClose<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.written(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.written(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.written(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A service counting its connection's requests in flight ([`Activity`]): each request from
/// its call until its response body is dropped.
#[derive(Clone)]
pub struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    /// [`SEND_STALL_TIMEOUT`].
    stall: Duration,
}

impl<S> Tracked<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Tracked {
            inner,
            activity,
            stall: SEND_STALL_TIMEOUT,
        }
    }

    /// Another stall timeout than [`SEND_STALL_TIMEOUT`] (a shorter request deadline, tests).
    pub fn with_stall_timeout(mut self, stall: Duration) -> Self {
        self.stall = stall;
        self
    }
}

impl<S, B, R> tower::Service<axum::http::Request<B>> for Tracked<S>
where
    S: tower::Service<axum::http::Request<B>, Response = axum::http::Response<R>>,
    S::Future: Send + 'static,
    R: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    R::Error: Into<axum::BoxError>,
{
    type Response = axum::http::Response<axum::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: axum::http::Request<B>) -> Self::Future {
        if let Some(client) = self.activity.client() {
            req.extensions_mut()
                .insert(super::clients::ClientAddr(client));
        }
        // RFC 9112 3.2: a server responds 400 to an HTTP/1.1 request without a Host field
        // (hyper answers it; a red-team finding). HTTP/1.0 needs none; HTTP/2 names its
        // authority otherwise.
        if let Some(why) = host_refusal(&req) {
            use axum::response::IntoResponse as _;
            let refused = super::error::AppError::bad_request(why).into_response();
            return Box::pin(async move { Ok(refused) });
        }
        let guard = self.activity.begin();
        let response = self.inner.call(req);
        let stall = self.stall;
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                axum::body::Body::new(Guarded::new(axum::body::Body::new(body), guard, stall))
            }))
        })
    }
}

/// Why an HTTP/1 request's Host is refused (RFC 9112 3.2: a server responds 400 to an
/// HTTP/1.1 request without one, and to any with several Host fields or one whose value is
/// not a host and port; red-team findings), `None` when it is taken. An empty Host is valid
/// (a target with no authority). HTTP/2 names its authority otherwise.
fn host_refusal<B>(req: &axum::http::Request<B>) -> Option<&'static str> {
    use axum::http::Version;
    if !matches!(req.version(), Version::HTTP_10 | Version::HTTP_11) {
        return None;
    }
    let mut hosts = req.headers().get_all(axum::http::header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Some(
            "a request carries one Host header field; this one has several (RFC 9112, section 3.2)",
        );
    }
    match first {
        None if req.version() == Version::HTTP_11 => {
            Some("an HTTP/1.1 request must carry a Host header field (RFC 9112, section 3.2)")
        }
        None => None,
        Some(v) if v.is_empty() => None,
        Some(v) => {
            let valid = v.to_str().ok().is_some_and(|s| {
                !s.contains('@') && s.parse::<axum::http::uri::Authority>().is_ok()
            });
            (!valid)
                .then_some("the Host header field is not a host and port (RFC 9112, section 3.2)")
        }
    }
}

/// How long a response may go without the client taking any of it before it is dropped: a
/// client that stops reading (an HTTP/2 flow-control window left at 0, an HTTP/1 socket not
/// read) held its answer's admission ticket, open files and request slot for ever (256
/// stalled streams kept every inference refused 503, and stalled WADO-RS streams ran the
/// server out of file descriptors: red-team findings).
pub const SEND_STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// What a [`Guarded`] body holds until it ends, is dropped, or is reaped.
struct Held {
    body: axum::body::Body,
    _guard: InFlight,
}

/// Shared between a [`Guarded`] body and the reaper.
struct Shared {
    held: std::sync::Mutex<Option<Held>>,
    /// Milliseconds from [`reaper_epoch`] to when the client last took a frame (or the
    /// response began).
    progress_ms: AtomicU64,
    stall: Duration,
    /// Dropped by the reaper (not ended).
    reaped: std::sync::atomic::AtomicBool,
}

/// A response body holding its request's [`InFlight`] until it is dropped, or until the
/// client has taken nothing of it for its stall timeout ([`SEND_STALL_TIMEOUT`]): the
/// reaper then drops what it holds (the response's admission ticket, files, its place in
/// the connection's requests in flight), and the stream ends with an error when polled.
struct Guarded {
    shared: Arc<Shared>,
}

impl Guarded {
    fn new(body: axum::body::Body, guard: InFlight, stall: Duration) -> Guarded {
        let shared = Arc::new(Shared {
            held: std::sync::Mutex::new(Some(Held {
                body,
                _guard: guard,
            })),
            progress_ms: AtomicU64::new(since_epoch_ms()),
            stall,
            reaped: std::sync::atomic::AtomicBool::new(false),
        });
        reap_when_stalled(&shared);
        Guarded { shared }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Option<Held>> {
        self.shared.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl http_body::Body for Guarded {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let mut held = self.held();
        let Some(h) = held.as_mut() else {
            if !self.shared.reaped.load(Ordering::Relaxed) {
                return Poll::Ready(None);
            }
            return Poll::Ready(Some(Err(axum::Error::new(
                "the response was dropped: the client took none of it for the stall timeout",
            ))));
        };
        let polled = Pin::new(&mut h.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => self
                .shared
                .progress_ms
                .store(since_epoch_ms(), Ordering::Relaxed),
            // Ended: what it held is given back now.
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => *held = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.held().as_ref().is_none_or(|h| h.body.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.held()
            .as_ref()
            .map_or_else(http_body::SizeHint::default, |h| h.body.size_hint())
    }
}

/// The reaper's clock.
fn reaper_epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn since_epoch_ms() -> u64 {
    reaper_epoch().elapsed().as_millis() as u64
}

/// Hands `shared` to the reaper: one task for the whole server, which looks at each
/// response once its stall timeout may have passed (a timer per response would cost a task
/// for every request).
fn reap_when_stalled(shared: &Arc<Shared>) {
    static REAPER: std::sync::OnceLock<
        tokio::sync::mpsc::UnboundedSender<std::sync::Weak<Shared>>,
    > = std::sync::OnceLock::new();
    let tx = REAPER.get_or_init(|| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(reaper(rx));
        tx
    });
    let _ = tx.send(Arc::downgrade(shared));
}

/// A response the reaper looks at once `at` (ms from [`reaper_epoch`]) has passed; the
/// heap orders them earliest first.
struct Due {
    at: u64,
    response: std::sync::Weak<Shared>,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.at.cmp(&self.at)
    }
}

async fn reaper(mut rx: tokio::sync::mpsc::UnboundedReceiver<std::sync::Weak<Shared>>) {
    let due_at = |s: &Shared| s.progress_ms.load(Ordering::Relaxed) + s.stall.as_millis() as u64;
    let mut due: std::collections::BinaryHeap<Due> = std::collections::BinaryHeap::new();
    loop {
        let next = due.peek().map(|d| d.at);
        let wake = async {
            match next {
                Some(at) => {
                    tokio::time::sleep_until(reaper_epoch() + Duration::from_millis(at)).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            received = rx.recv() => {
                let Some(response) = received else { return };
                let Some(shared) = response.upgrade() else { continue };
                due.push(Due { at: due_at(&shared), response });
            }
            () = wake => {
                let Some(d) = due.pop() else { continue };
                // Dropped (ended and gone) meanwhile: nothing to do.
                let Some(shared) = d.response.upgrade() else { continue };
                let mut held = shared.held.lock().unwrap_or_else(|p| p.into_inner());
                if held.is_none() {
                    continue;
                }
                let at = due_at(&shared);
                if since_epoch_ms() >= at {
                    tracing::warn!(
                        stall_secs = shared.stall.as_secs(),
                        "response dropped: the client took none of it for the stall timeout"
                    );
                    shared.reaped.store(true, Ordering::Relaxed);
                    *held = None;
                } else {
                    drop(held);
                    due.push(Due { at, response: d.response });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A body that records being dropped (what an admission ticket or an open file does).
    struct Watched(Arc<std::sync::atomic::AtomicBool>);

    impl Drop for Watched {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    impl http_body::Body for Watched {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
            Poll::Ready(Some(Ok(http_body::Frame::data(bytes::Bytes::from_static(
                b"x",
            )))))
        }
    }

    /// Red-team finding: a client that never reads (an HTTP/2 window of 0) held its answer,
    /// and the answer's admission ticket and files, for ever. A response the client takes
    /// nothing of for the stall timeout is dropped; one it reads is not.
    #[tokio::test]
    async fn a_response_the_client_does_not_read_is_dropped_at_the_stall_timeout() {
        use http_body_util::BodyExt;
        let activity = Activity::new();
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stalled = Guarded::new(
            axum::body::Body::new(Watched(dropped.clone())),
            activity.begin(),
            Duration::from_millis(200),
        );
        let read = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut reading = Guarded::new(
            axum::body::Body::new(Watched(read.clone())),
            activity.begin(),
            Duration::from_millis(200),
        );
        assert_eq!(activity.inflight.load(Ordering::Relaxed), 2);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dropped.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "not reaped within 30 s");
            // The reading client takes a frame every 50 ms.
            let frame = reading.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "x");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Reaped: what it held is given back, its request is no longer in flight, and a
        // late poll ends the stream with an error.
        assert_eq!(activity.inflight.load(Ordering::Relaxed), 1);
        assert!(!read.load(Ordering::SeqCst));
        let mut stalled = stalled;
        assert!(stalled.frame().await.unwrap().is_err());
        drop(reading);
        assert!(read.load(Ordering::SeqCst));
        assert_eq!(activity.inflight.load(Ordering::Relaxed), 0);
    }

    /// A connection that sends nothing ends at the first-byte deadline, not the idle timeout;
    /// one that sends a byte in time is held to the idle timeout from then on.
    #[tokio::test]
    async fn a_silent_connection_ends_at_the_first_byte_deadline() {
        let (_client, server) = tokio::io::duplex(64);
        let mut io = IdleClose::new(server, Activity::new(), Duration::from_secs(300))
            .with_first_byte_deadline(Duration::from_millis(200));
        let started = Instant::now();
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(30), io.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0))), "{read:?}");
        assert!(started.elapsed() >= Duration::from_millis(200));

        let (mut client, server) = tokio::io::duplex(64);
        let mut io = IdleClose::new(server, Activity::new(), Duration::from_millis(1500))
            .with_first_byte_deadline(Duration::from_millis(200));
        client.write_all(b"G").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        let read = tokio::time::timeout(Duration::from_secs(30), io.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0))), "{read:?}");
        // Ended by the idle timeout (from the connection's start), past the first-byte one.
        assert!(io.activity.start.elapsed() >= Duration::from_millis(1500));
    }

    /// Part of the HTTP/2 preface does not end the first-byte deadline (a TLS client that
    /// sent `PRI * HTTP/2.0` and stalled was held for the idle timeout: a re-attack's
    /// finding); the whole preface does, and so does a byte that cannot begin it.
    #[tokio::test]
    async fn part_of_the_http2_preface_keeps_the_first_byte_deadline() {
        let mut buf = [0u8; 64];
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = IdleClose::new(server, Activity::new(), Duration::from_secs(300))
            .with_first_byte_deadline(Duration::from_millis(200));
        client.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 16);
        let read = tokio::time::timeout(Duration::from_secs(30), io.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0))), "{read:?}");
        for (sent, known) in [
            (crate::http::serve::H2_PREFACE, true),
            (&b"POST / HTTP/1.1\r\n"[..], true),
        ] {
            let (mut client, server) = tokio::io::duplex(64);
            let mut io = IdleClose::new(server, Activity::new(), Duration::from_millis(1500))
                .with_first_byte_deadline(Duration::from_millis(200));
            client.write_all(sent).await.unwrap();
            assert!(io.read(&mut buf).await.unwrap() > 0);
            assert_eq!(io.first_byte.is_none(), known);
        }
    }

    /// Red-team finding: a response hyper held for a peer that read nothing stayed in memory
    /// as long as the connection was open. A write blocked for the stall timeout fails (and
    /// hyper then closes the connection); one the peer keeps taking does not.
    #[tokio::test]
    async fn a_write_the_peer_takes_nothing_of_fails_at_the_stall_timeout() {
        use tokio::io::AsyncWriteExt;
        let (_client, server) = tokio::io::duplex(64);
        let mut io = IdleClose::new(server, Activity::new(), Duration::from_secs(300))
            .with_write_stall(Duration::from_millis(200));
        let started = Instant::now();
        let wrote = tokio::time::timeout(Duration::from_secs(30), io.write_all(&[7u8; 4096])).await;
        let Ok(Err(e)) = wrote else {
            panic!("{wrote:?}")
        };
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(200));

        // A slow reader that keeps taking: each blocked write is released before the
        // deadline, and the whole response gets through.
        let (mut client, server) = tokio::io::duplex(64);
        let mut io = IdleClose::new(server, Activity::new(), Duration::from_secs(300))
            .with_write_stall(Duration::from_millis(300));
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 64];
            while got < 1024 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                got += client.read(&mut buf).await.unwrap();
            }
            got
        });
        tokio::time::timeout(Duration::from_secs(30), io.write_all(&[7u8; 1024]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reader.await.unwrap(), 1024);
    }
}
