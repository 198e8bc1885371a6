//! HTTPS as a client sees it, with a throwaway PKI made by `scripts/test-pki.sh` (the openssl
//! command-line tool) in a temporary folder: the certificate fingerprints and subjects the
//! tests expect are openssl's, not computed by the code under test.
//!
//! - the server binary serves `/v2/health/ready` over HTTP/2 (ALPN `h2`) and HTTP/1.1; plain
//!   HTTP to the TLS port gets 400 saying to use https:// and the server stays up;
//! - `SIGHUP` swaps in a new certificate for new connections; a broken one is logged and the
//!   old one keeps serving;
//! - a bad certificate or key stops the start-up with the file's name;
//! - mutual TLS: the acceptor hands the verified client certificate to the handlers (subject
//!   and SHA-256), a client without one connects when client auth is optional and is refused
//!   when it is required, and a certificate from another CA is refused.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{Request, StatusCode, Version};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nightingale::http::identity::ClientCertificate;
use nightingale::tls::{self, ClientAuth, TlsSettings};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const WAIT: Duration = Duration::from_secs(120);

/// Makes the test PKI in a new temporary folder.
fn pki() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/test-pki.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg(dir.path())
        .output()
        .expect("bash runs scripts/test-pki.sh");
    assert!(
        out.status.success(),
        "test-pki.sh failed (is openssl installed?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// What openssl wrote beside a certificate: `<name>.sha256` or `<name>.subject`.
fn openssl_says(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap()
        .trim()
        .to_owned()
}

fn client_config(
    ca: &Path,
    alpn: &[&[u8]],
    identity: Option<(&Path, &Path)>,
) -> Arc<rustls::ClientConfig> {
    tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

async fn connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))??;
    let name = ServerName::IpAddress(addr.ip().into());
    let stream = tokio::time::timeout(
        Duration::from_secs(10),
        TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake timed out"))??;
    // TLS 1.3: a server that refuses the client's certificate says so after the handshake;
    // the first read shows it. Callers that need that read do a request.
    Ok(stream)
}

/// SHA-256 (hex) of the server's leaf certificate on this connection.
fn server_sha256(stream: &TlsStream<TcpStream>) -> String {
    use sha2::Digest;
    let leaf = &stream.get_ref().1.peer_certificates().unwrap()[0];
    hex::encode(sha2::Sha256::digest(leaf.as_ref()))
}

/// GET `path` on the connection, over HTTP/2 when ALPN chose `h2`, else HTTP/1.1.
async fn get(
    stream: TlsStream<TcpStream>,
    addr: SocketAddr,
    path: &str,
) -> Result<(StatusCode, Version, String), hyper::Error> {
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(stream);
    let response = if h2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        let req = Request::get(format!("https://{addr}{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        send.send_request(req).await?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", addr.to_string())
            .body(Empty::<Bytes>::new())
            .unwrap();
        send.send_request(req).await?
    };
    let status = response.status();
    let version = response.version();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, version, String::from_utf8_lossy(&body).into_owned()))
}

fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// The server binary; killed when the test ends, however it ends.
struct Server {
    child: Child,
    addr: SocketAddr,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(args: &[&std::ffi::OsStr]) -> Server {
        Server::spawn(args, None)
    }

    /// The server with its stderr in `stderr.log`, or in `pipe` when given.
    fn spawn(args: &[&std::ffi::OsStr], pipe: Option<Stdio>) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let repository = dir.path().join("repository");
        std::fs::create_dir(&repository).unwrap();
        let addr = free_addr();
        let stderr = dir.path().join("stderr.log");
        let child = Command::new(env!("CARGO_BIN_EXE_nightingale"))
            .arg("serve")
            .arg("--repository")
            .arg(&repository)
            .args(["--http-addr", &addr.to_string()])
            .arg("--audit-log")
            .arg(dir.path().join("audit.jsonl"))
            .args(args)
            .env("NIGHTINGALE_LOG", "info")
            .env_remove("NIGHTINGALE_CONFIG")
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(pipe.unwrap_or_else(|| std::fs::File::create(&stderr).unwrap().into()))
            .spawn()
            .unwrap();
        Server {
            child,
            addr,
            stderr,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (bounded) until `/v2/health/ready` answers 200 over TLS.
    async fn wait_ready(&mut self, config: Arc<rustls::ClientConfig>) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("server exited with {status}:\n{}", self.log());
            }
            if let Ok(stream) = connect(self.addr, config.clone()).await
                && let Ok((StatusCode::OK, _, _)) = get(stream, self.addr, "/v2/health/ready").await
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not ready within {WAIT:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn hangup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_args(cert: &Path, key: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "--tls-cert".into(),
        cert.into(),
        "--tls-key".into(),
        key.into(),
    ]
}

fn os(args: &[std::ffi::OsString]) -> Vec<&std::ffi::OsStr> {
    args.iter().map(|a| a.as_os_str()).collect()
}

/// Red-team finding: with its stderr a pipe whose reader had gone (`serve ... | head`, a log
/// shipper that died), the server died at start-up over plain HTTP, and over TLS ignored
/// SIGTERM for good (the shutdown's log line panicked before the graceful shutdown began).
/// Both now serve, and stop on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_log_reader_is_gone_serves_and_stops_on_sigterm() {
    let pki = pki();
    let p = pki.path();
    for tls in [true, false] {
        let args = if tls {
            tls_args(&p.join("server.pem"), &p.join("server.key"))
        } else {
            Vec::new()
        };
        let mut server = Server::spawn(&os(&args), Some(Stdio::piped()));
        drop(server.child.stderr.take());
        if tls {
            server
                .wait_ready(client_config(&p.join("ca.pem"), &[b"http/1.1"], None))
                .await;
        } else {
            let deadline = Instant::now() + WAIT;
            loop {
                if let Some(status) = server.child.try_wait().unwrap() {
                    panic!("the plain server exited with {status}");
                }
                let addr = server.addr;
                let ready = tokio::task::spawn_blocking(move || {
                    std::net::TcpStream::connect(addr).is_ok_and(|mut s| {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut out = String::new();
                        s.write_all(
                            b"GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                        )
                        .is_ok()
                            && s.read_to_string(&mut out).is_ok()
                            && out.starts_with("HTTP/1.1 200")
                    })
                })
                .await
                .unwrap();
                if ready {
                    break;
                }
                assert!(Instant::now() < deadline, "the plain server was not ready");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let status = Command::new("kill")
            .args(["-TERM", &server.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        let exited = loop {
            if let Some(status) = server.child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "tls={tls}: still running 30 s after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(exited.success(), "tls={tls}: {exited}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_h2_by_alpn_and_http1_and_plain_http_answered_400() {
    let pki = pki();
    let p = pki.path();
    let args = tls_args(&p.join("server.pem"), &p.join("server.key"));
    let mut server = Server::start(&os(&args));
    server
        .wait_ready(client_config(&p.join("ca.pem"), &[b"http/1.1"], None))
        .await;
    assert!(
        server.log().contains("listening (KServe v2 HTTPS)"),
        "{}",
        server.log()
    );

    // ALPN h2 offered: HTTP/2.
    let stream = connect(
        server.addr,
        client_config(&p.join("ca.pem"), &[b"h2", b"http/1.1"], None),
    )
    .await
    .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(server_sha256(&stream), openssl_says(p, "server.sha256"));
    let (status, version, _) = get(stream, server.addr, "/v2/health/ready").await.unwrap();
    assert_eq!((status, version), (StatusCode::OK, Version::HTTP_2));

    // Only http/1.1 offered: HTTP/1.1.
    let stream = connect(
        server.addr,
        client_config(&p.join("ca.pem"), &[b"http/1.1"], None),
    )
    .await
    .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (status, version, body) = get(stream, server.addr, "/v2").await.unwrap();
    assert_eq!((status, version), (StatusCode::OK, Version::HTTP_11));
    assert!(body.contains("\"nightingale\""), "{body}");

    // A client that does not trust the test CA refuses the server.
    let err = connect(
        server.addr,
        client_config(&p.join("other-ca.pem"), &[b"h2"], None),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");

    // Plain HTTP to the TLS port: 400 saying to use https://, the connection closes (bounded),
    // and the server keeps serving TLS.
    let addr = server.addr;
    let answer = tokio::task::spawn_blocking(move || {
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        tcp.write_all(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut answer = Vec::new();
        // Until the server closes; a timeout fails the test.
        tcp.read_to_end(&mut answer)
            .expect("plain HTTP on the TLS port: the server closes after its answer");
        String::from_utf8(answer).unwrap()
    })
    .await
    .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n")
            && answer.ends_with(
                "\r\n\r\n{\"error\":\"this port speaks HTTPS: use https:// to reach it\"}"
            ),
        "{answer}"
    );
    let stream = connect(
        server.addr,
        client_config(&p.join("ca.pem"), &[b"h2"], None),
    )
    .await
    .unwrap();
    let (status, _, _) = get(stream, server.addr, "/v2/health/live").await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

/// `serve --grpc-addr` with `--tls-cert`: the gRPC port speaks TLS with the same certificate
/// (ALPN h2), and a raw gRPC call (`ServerLive`, framed by hand) is answered `live: true`.
#[cfg(feature = "grpc")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_port_speaks_tls_with_the_same_certificate() {
    let pki = pki();
    let p = pki.path();
    let grpc = free_addr();
    let live = tempfile::tempdir().unwrap();
    let (cert, key) = (live.path().join("cert.pem"), live.path().join("key.pem"));
    std::fs::copy(p.join("server.pem"), &cert).unwrap();
    std::fs::copy(p.join("server.key"), &key).unwrap();
    let mut args = tls_args(&cert, &key);
    args.extend(["--grpc-addr".into(), grpc.to_string().into()]);
    let mut server = Server::start(&os(&args));
    server
        .wait_ready(client_config(&p.join("ca.pem"), &[b"h2"], None))
        .await;
    assert!(
        server.log().contains("listening (KServe v2 gRPC over TLS)"),
        "{}",
        server.log()
    );
    let stream = connect(grpc, client_config(&p.join("ca.pem"), &[b"h2"], None))
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(server_sha256(&stream), openssl_says(p, "server.sha256"));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    // An empty ServerLiveRequest: uncompressed flag, length 0.
    let req = Request::post(format!(
        "https://{grpc}/inference.GRPCInferenceService/ServerLive"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(http_body_util::Full::new(Bytes::from_static(&[
        0, 0, 0, 0, 0,
    ])))
    .unwrap();
    let response = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .unwrap()
        .unwrap();
    let trailers = body.trailers().cloned().unwrap_or_default();
    assert_eq!(trailers.get("grpc-status").unwrap(), "0", "{trailers:?}");
    // ServerLiveResponse { live: true }: field 1, varint 1.
    assert_eq!(&body.to_bytes()[..], &[0, 0, 0, 0, 2, 0x08, 0x01]);

    // One SIGHUP, one reload for both listeners (each reloaded on its own: a file rewritten
    // during the signal could leave one listener on the old files, a re-attack's finding).
    std::fs::copy(p.join("server2.pem"), &cert).unwrap();
    std::fs::copy(p.join("server2.key"), &key).unwrap();
    server.hangup();
    let second = openssl_says(p, "server2.sha256");
    wait_for_certificate(&server, &p.join("ca.pem"), &second).await;
    let stream = connect(grpc, client_config(&p.join("ca.pem"), &[b"h2"], None))
        .await
        .unwrap();
    assert_eq!(server_sha256(&stream), second);
    let reloads = || {
        server
            .log()
            .matches("SIGHUP: TLS certificate reloaded")
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while reloads() == 0 {
        assert!(Instant::now() < deadline, "{}", server.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A second reload of the same signal would have been logged by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(reloads(), 1, "{}", server.log());
}

/// Polls (bounded) until a new connection shows the certificate `want`.
async fn wait_for_certificate(server: &Server, ca: &Path, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stream = connect(server.addr, client_config(ca, &[b"h2"], None))
            .await
            .unwrap();
        if server_sha256(&stream) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "certificate {want} not served within 30 s:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_a_broken_one_keeps_the_old() {
    let pki = pki();
    let p = pki.path();
    let live = tempfile::tempdir().unwrap();
    let (cert, key) = (live.path().join("cert.pem"), live.path().join("key.pem"));
    std::fs::copy(p.join("server.pem"), &cert).unwrap();
    std::fs::copy(p.join("server.key"), &key).unwrap();
    let ca = p.join("ca.pem");
    let args = tls_args(&cert, &key);
    let mut server = Server::start(&os(&args));
    server.wait_ready(client_config(&ca, &[b"h2"], None)).await;
    let first = openssl_says(p, "server.sha256");
    let second = openssl_says(p, "server2.sha256");
    assert_ne!(first, second);
    wait_for_certificate(&server, &ca, &first).await;

    // An open connection keeps its certificate; new ones get the new pair.
    let open = connect(server.addr, client_config(&ca, &[b"h2"], None))
        .await
        .unwrap();
    std::fs::copy(p.join("server2.pem"), &cert).unwrap();
    std::fs::copy(p.join("server2.key"), &key).unwrap();
    server.hangup();
    wait_for_certificate(&server, &ca, &second).await;
    assert_eq!(server_sha256(&open), first);
    let (status, _, _) = get(open, server.addr, "/v2/health/ready").await.unwrap();
    assert_eq!(status, StatusCode::OK);

    // A broken certificate file: logged, the second pair stays in service.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    server.hangup();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server.log().contains("TLS reload failed") {
        assert!(
            Instant::now() < deadline,
            "no reload failure logged within 30 s:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(server.log().contains(&cert.display().to_string()));
    // A key that is not the certificate's: refused the same way.
    std::fs::copy(p.join("server.pem"), &cert).unwrap();
    server.hangup();
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.log().matches("TLS reload failed").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "no second reload failure logged within 30 s:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A pair that loads but has expired: refused too (clients would refuse it), said so.
    std::fs::copy(p.join("expired.pem"), &cert).unwrap();
    std::fs::copy(p.join("expired.key"), &key).unwrap();
    server.hangup();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server
        .log()
        .contains("TLS reload refused: the new certificate is not valid now")
    {
        assert!(
            Instant::now() < deadline,
            "no refusal of an expired certificate logged within 30 s:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(server.log().contains("expired on"), "{}", server.log());
    let stream = connect(server.addr, client_config(&ca, &[b"h2"], None))
        .await
        .unwrap();
    assert_eq!(server_sha256(&stream), second);
    let (status, _, _) = get(stream, server.addr, "/v2/health/ready").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(server.child.try_wait().unwrap(), None);
}

/// A server started with a certificate that has expired serves (a restart is no outage of
/// its own) and says at once, as an error, that clients will refuse it.
#[test]
fn an_expired_certificate_at_start_is_an_error_in_the_log() {
    let pki = pki();
    let p = pki.path();
    let args = tls_args(&p.join("expired.pem"), &p.join("expired.key"));
    let mut server = Server::start(&os(&args));
    let deadline = Instant::now() + WAIT;
    while !server.log().contains("listening") {
        assert_eq!(server.child.try_wait().unwrap(), None, "{}", server.log());
        assert!(
            Instant::now() < deadline,
            "not listening:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = server.log();
    assert!(
        log.contains("the TLS certificate is not valid now") && log.contains("expired on"),
        "{log}"
    );
}

/// Runs `nightingale serve` with these arguments and expects it to exit with an error (within
/// the bound) whose message contains `needle`.
fn start_fails(args: &[&std::ffi::OsStr], needle: &str) {
    let mut server = Server::start(args);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running: {}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let log = server.log();
    assert!(log.contains(needle), "{needle:?} not in:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn bad_tls_files_and_settings_stop_the_start_naming_the_file() {
    let pki = pki();
    let p = pki.path();
    let (cert, key, key2) = (
        p.join("server.pem"),
        p.join("server.key"),
        p.join("server2.key"),
    );
    let missing = p.join("missing.pem");
    start_fails(
        &os(&tls_args(&missing, &key)),
        &format!("cannot read {}", missing.display()),
    );
    start_fails(
        &os(&tls_args(&cert, &key2)),
        &format!(
            "certificate {} and key {} cannot be used together",
            cert.display(),
            key2.display()
        ),
    );
    // A key file given as the certificate (PEM, but no certificate in it).
    start_fails(
        &os(&tls_args(&key, &key)),
        &format!("{}: no certificate in the file", key.display()),
    );
    start_fails(
        &os(&tls_args(&cert, &cert)),
        &format!("{}: no private key in the file", cert.display()),
    );
    // Encrypted keys (PKCS#8, traditional PEM) are refused as encrypted, not "no key".
    for encrypted in ["client.enc.key", "client.trad-enc.key"] {
        start_fails(
            &os(&tls_args(&p.join("client.pem"), &p.join(encrypted))),
            &format!(
                "{}: the private key is encrypted",
                p.join(encrypted).display()
            ),
        );
    }
    start_fails(
        &os(&["--tls-cert".into(), cert.clone().into_os_string()]),
        "--tls-cert (tls_cert) is set but --tls-key (tls_key) is not: give both or neither",
    );
    start_fails(
        &os(&["--tls-client-ca".into(), p.join("ca.pem").into_os_string()]),
        "need --tls-cert and --tls-key",
    );
    // A client's own certificate as the client CA (an operator "pinning" one client): its
    // key could sign any identity (a review's finding). Refused, naming the file.
    let mut args = tls_args(&cert, &key);
    args.extend([
        "--tls-client-ca".into(),
        p.join("client.pem").into_os_string(),
    ]);
    start_fails(
        &os(&args),
        &format!(
            "client CA {}: certificate 1 (O=Nightingale Tests, CN=nightingale-test-client) is not a CA certificate (basic constraints say CA:FALSE)",
            p.join("client.pem").display()
        ),
    );
    // Nor one that cannot be read as X.509 (webpki reads little of a trust anchor: a
    // garbled "v1" client certificate let its key mint identities, a re-attack's finding).
    let garbled = p.join("garbled-ca.pem");
    std::fs::write(
        &garbled,
        "-----BEGIN CERTIFICATE-----\nMAwGAQAGAQAGAQAGAQA=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let mut args = tls_args(&cert, &key);
    args.extend(["--tls-client-ca".into(), garbled.clone().into_os_string()]);
    start_fails(
        &os(&args),
        &format!(
            "client CA {}: certificate 1 ((cannot be read)) is not a CA certificate (it is not a well-formed X.509 certificate)",
            garbled.display()
        ),
    );
}

/// A router that tells the caller which client certificate the acceptor handed it.
fn whoami() -> axum::Router {
    axum::Router::new().route(
        "/whoami",
        axum::routing::get(
            |cert: Option<axum::Extension<ClientCertificate>>| async move {
                match cert {
                    Some(axum::Extension(c)) => format!("{}\n{}", c.subject, c.sha256),
                    None => "anonymous".to_owned(),
                }
            },
        ),
    )
}

/// Serves `whoami` through [`tls::ClientCertAcceptor`] on a port of its own.
async fn serve_whoami(settings: &TlsSettings) -> (SocketAddr, axum_server::Handle<SocketAddr>) {
    tls::install_crypto_provider();
    let config = tls::load_server_config(settings).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp(listener)
        .unwrap()
        .acceptor(tls::ClientCertAcceptor::new(
            axum_server::tls_rustls::RustlsConfig::from_config(config),
        ))
        .handle(handle.clone());
    tokio::spawn(server.serve(whoami().into_make_service()));
    (addr, handle)
}

/// A plain HTTP/1.1 GET of `path`: the status line's code, or `None` when nothing answers.
fn plain_get(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    answer.split(' ').nth(1)?.parse().ok()
}

/// A review's finding: without TLS no SIGHUP handler was installed, so a SIGHUP (a
/// `systemctl reload`, a log rotation hook) ended the server at once, without its graceful
/// shutdown. It is logged, and the server serves on.
#[test]
fn a_sighup_without_tls_is_logged_and_the_server_serves_on() {
    let mut server = Server::start(&[]);
    let deadline = Instant::now() + WAIT;
    while plain_get(server.addr, "/v2/health/live") != Some(200) {
        assert!(
            server.child.try_wait().unwrap().is_none(),
            "{}",
            server.log()
        );
        assert!(Instant::now() < deadline, "not live: {}", server.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Two SIGHUPs, each after the one before was logged (two sent at once may be delivered
    // as one: the kernel keeps one pending signal of a kind).
    for sent in 1..=2 {
        server.hangup();
        let deadline = Instant::now() + WAIT;
        while server.log().matches("nothing to reload").count() < sent {
            assert!(
                server.child.try_wait().unwrap().is_none(),
                "the server stopped on SIGHUP: {}",
                server.log()
            );
            assert!(
                Instant::now() < deadline,
                "SIGHUP not logged: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert_eq!(plain_get(server.addr, "/v2/health/live"), Some(200));
    assert!(server.child.try_wait().unwrap().is_none());
}

/// How each of three connections in a row, each with one request, was set up.
async fn handshake_kinds(
    settings: &TlsSettings,
    config: Arc<rustls::ClientConfig>,
) -> Vec<rustls::HandshakeKind> {
    let (addr, handle) = serve_whoami(settings).await;
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let stream = connect(addr, config.clone()).await.unwrap();
        kinds.push(stream.get_ref().1.handshake_kind().unwrap());
        // The answer read: TLS 1.3 tickets come after the handshake.
        let (status, _, _) = get(stream, addr, "/whoami").await.unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    handle.shutdown();
    kinds
}

/// A review's finding: a resumed TLS session brought back the client certificate of its
/// first handshake without a check, so a client whose certificate had expired kept its
/// identity for as long as it resumed (an inference was audited under it after expiry).
/// With client certificates configured every connection is a full handshake; without them
/// the same client resumes (the control: it would, were it allowed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_resumption_where_clients_present_certificates() {
    use rustls::HandshakeKind::{Full, Resumed};
    let pki = pki();
    let p = pki.path();
    let ca = p.join("ca.pem");
    let mut settings = TlsSettings {
        cert: p.join("server.pem"),
        key: p.join("server.key"),
        client_ca: None,
        client_auth: ClientAuth::Optional,
    };
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let kinds = handshake_kinds(&settings, client_config(&ca, &[alpn], None)).await;
        assert_eq!(kinds, [Full, Resumed, Resumed]);
    }
    settings.client_ca = Some(ca.clone());
    for auth in [ClientAuth::Optional, ClientAuth::Required] {
        settings.client_auth = auth;
        for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
            let config = client_config(
                &ca,
                &[alpn],
                Some((&p.join("client.pem"), &p.join("client.key"))),
            );
            assert_eq!(handshake_kinds(&settings, config).await, [Full, Full, Full]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_hands_the_verified_client_certificate_to_handlers() {
    let pki = pki();
    let p = pki.path();
    let ca = p.join("ca.pem");
    let client = (p.join("client.pem"), p.join("client.key"));
    let stranger = (p.join("other-client.pem"), p.join("other-client.key"));
    let mut settings = TlsSettings {
        cert: p.join("server.pem"),
        key: p.join("server.key"),
        client_ca: Some(ca.clone()),
        client_auth: ClientAuth::Optional,
    };

    let (addr, handle) = serve_whoami(&settings).await;
    // With a certificate from the client CA: its subject and fingerprint, on HTTP/2 and 1.1.
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let config = client_config(&ca, &[alpn], Some((&client.0, &client.1)));
        let stream = connect(addr, config).await.unwrap();
        let (status, _, body) = get(stream, addr, "/whoami").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body,
            format!(
                "{}\n{}",
                openssl_says(p, "client.subject"),
                openssl_says(p, "client.sha256")
            )
        );
    }
    // Optional: no certificate, no identity, still served.
    let stream = connect(addr, client_config(&ca, &[b"h2"], None))
        .await
        .unwrap();
    let (status, _, body) = get(stream, addr, "/whoami").await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "anonymous"));
    // A certificate from another CA: refused (TLS 1.3 reports it on the first read).
    let refused = match connect(
        addr,
        client_config(&ca, &[b"h2"], Some((&stranger.0, &stranger.1))),
    )
    .await
    {
        Err(_) => true,
        Ok(stream) => get(stream, addr, "/whoami").await.is_err(),
    };
    assert!(
        refused,
        "a client certificate from an unknown CA was accepted"
    );
    // A certificate with an empty subject (a workload certificate): known by its subject
    // alternative names (every such certificate was the one caller `tls:`).
    let san = (p.join("san-client.pem"), p.join("san-client.key"));
    let stream = connect(addr, client_config(&ca, &[b"h2"], Some((&san.0, &san.1))))
        .await
        .unwrap();
    let (status, _, body) = get(stream, addr, "/whoami").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body.lines().next(),
        Some("SAN:DNS:workload.example,URI:spiffe://example.org/ns/radiology/sa/gateway")
    );
    // Names of other kinds with their values: two users' UPNs are two callers.
    let mut upns = Vec::new();
    for who in ["upn-alice", "upn-bob"] {
        let (cert, key) = (p.join(format!("{who}.pem")), p.join(format!("{who}.key")));
        let stream = connect(addr, client_config(&ca, &[b"h2"], Some((&cert, &key))))
            .await
            .unwrap();
        let (status, _, body) = get(stream, addr, "/whoami").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        upns.push(body.lines().next().unwrap().to_owned());
    }
    assert!(
        upns[0].starts_with("SAN:otherName:1.3.6.1.4.1.311.20.2.3#"),
        "{upns:?}"
    );
    assert_ne!(upns[0], upns[1]);
    handle.shutdown();

    // Required: a client without a certificate is refused, one with it is served.
    settings.client_auth = ClientAuth::Required;
    let (addr, handle) = serve_whoami(&settings).await;
    let refused = match connect(addr, client_config(&ca, &[b"h2"], None)).await {
        Err(_) => true,
        Ok(stream) => get(stream, addr, "/whoami").await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");
    let stream = connect(
        addr,
        client_config(&ca, &[b"h2"], Some((&client.0, &client.1))),
    )
    .await
    .unwrap();
    let (status, _, body) = get(stream, addr, "/whoami").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.starts_with(&openssl_says(p, "client.subject")),
        "{body}"
    );
    handle.shutdown();
}
