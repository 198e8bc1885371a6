"""Real-peer tests: Triton's own Python client (tritonclient.http) over HTTPS.

Each server here is started by this module (not the session's plain-HTTP server):

    $NIGHTINGALE_BIN serve --repository models/bundles --http-addr 127.0.0.1:<free port>
        --tls-cert server.pem --tls-key server.key [--tls-client-ca ca.pem --tls-client-auth required]

with a throwaway PKI that scripts/test-pki.sh makes with the openssl command-line tool in a
temporary folder (a test CA, a server certificate for 127.0.0.1/localhost, a client certificate,
and a certificate from an unrelated CA). Expected outputs come from onnxruntime on the same
model file (fixture `reference` in conftest.py).

- tritonclient with `ssl=True` and an SSL context that trusts the test CA infers on
  wdbc-malignancy version 1 and gets onnxruntime's answers;
- a client that does not trust the test CA is refused;
- plain HTTP to the TLS port gets 400 saying to use https:// (and the connection closes); the
  server stays up;
- with mutual TLS required, tritonclient with the client certificate is served and one
  without it is refused;
- SIGTERM during a request over HTTPS: the request is answered, then the server exits 0.

These tests ignore $NIGHTINGALE_URL: they need a server started with TLS files they made.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import gevent.ssl
import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

REPO = Path(__file__).resolve().parents[2]
MODEL = "wdbc-malignancy"
MODEL_VERSION = "1"
ATOL = 1e-5
READY_TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary() -> Path:
    binary = Path(os.environ.get("NIGHTINGALE_BIN", "target/debug/nightingale"))
    if not binary.is_absolute():
        binary = REPO / binary
    if not binary.exists():
        pytest.fail(f"Nightingale server binary not found at {binary}", pytrace=False)
    return binary


@pytest.fixture(scope="module")
def pki() -> Path:
    out = Path(tempfile.mkdtemp(prefix="nightingale-pki-"))
    subprocess.run(["bash", str(REPO / "scripts" / "test-pki.sh"), str(out)], check=True,
                   timeout=120)
    return out


class TlsServer:
    def __init__(self, pki: Path, extra: list[str]):
        self.pki = pki
        self.addr = f"127.0.0.1:{_free_port()}"
        self.logdir = Path(tempfile.mkdtemp(prefix="nightingale-tls-"))
        self.stderr_path = self.logdir / "stderr.log"
        env = dict(os.environ)
        env.pop("NIGHTINGALE_CONFIG", None)
        import onnxruntime as ort

        libs = sorted((Path(ort.__file__).resolve().parent / "capi").glob("libonnxruntime.so*"))
        if libs and "ORT_DYLIB_PATH" not in env:
            env["ORT_DYLIB_PATH"] = str(libs[-1])
        self.cmd = [str(_binary()), "serve", "--repository", "models/bundles",
                    "--http-addr", self.addr, "--audit-log", str(self.logdir / "audit.jsonl"),
                    "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                    *extra]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                                         stderr=err, env=env)

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-20000:]

    def wait_ready(self, cert: tuple[str, str] | None) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no response"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                last = f"server exited with status {self.proc.returncode}"
                break
            try:
                r = requests.get(f"https://{self.addr}/v2/health/ready", timeout=2,
                                 verify=str(self.pki / "ca.pem"), cert=cert)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except requests.RequestException as e:
                last = repr(e)
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"`{' '.join(self.cmd)}` not ready within {READY_TIMEOUT_S:.0f} s "
                    f"({last}):\n{self.log()}", pytrace=False)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tls_server(pki):
    server = TlsServer(pki, [])
    server.wait_ready(None)
    yield server
    server.stop()
    # Stopped by SIGTERM: a graceful exit, and the audit trail of the session verifies.
    assert server.proc.returncode == 0, server.log()
    check = subprocess.run([str(_binary()), "audit", "verify",
                            str(server.logdir / "audit.jsonl")],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.fixture(scope="module")
def mtls_server(pki):
    server = TlsServer(pki, ["--tls-client-ca", str(pki / "ca.pem"),
                             "--tls-client-auth", "required"])
    server.wait_ready((str(pki / "client.pem"), str(pki / "client.key")))
    yield server
    server.stop()


def _trusting(ca: Path):
    """An ssl_context_factory whose contexts trust only the test CA."""

    def factory(*_args, **_kwargs):
        return gevent.ssl.create_default_context(cafile=str(ca))

    return factory


def _infer(client, x: np.ndarray):
    inp = httpclient.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    outputs = [httpclient.InferRequestedOutput("label", binary_data=True),
               httpclient.InferRequestedOutput("probabilities", binary_data=False)]
    return client.infer(MODEL, [inp], model_version=MODEL_VERSION, outputs=outputs)


def _check(res, x: np.ndarray, reference) -> None:
    want_label, want_prob = reference(x)
    np.testing.assert_array_equal(res.as_numpy("label"), want_label)
    np.testing.assert_allclose(res.as_numpy("probabilities"), want_prob, rtol=0, atol=ATOL)


def test_tritonclient_infers_over_https_with_the_test_ca(tls_server, pki, test_rows, reference):
    x, _ = test_rows
    client = httpclient.InferenceServerClient(url=tls_server.addr, ssl=True,
                                              ssl_context_factory=_trusting(pki / "ca.pem"),
                                              network_timeout=30.0)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL, MODEL_VERSION)
        assert client.get_server_metadata()["name"] == "nightingale"
        for start, n in [(0, 1), (0, 64), (3, 7), (64, len(x) - 64)]:
            batch = np.ascontiguousarray(x[start:start + n])
            _check(_infer(client, batch), batch, reference)
    finally:
        client.close()


def test_a_client_that_does_not_trust_the_ca_is_refused(tls_server, pki):
    # The unrelated CA, then the system's trust store: neither knows the test CA.
    for factory in [_trusting(pki / "other-ca.pem"), None]:
        client = httpclient.InferenceServerClient(url=tls_server.addr, ssl=True,
                                                  ssl_context_factory=factory,
                                                  network_timeout=30.0)
        try:
            with pytest.raises(ssl.SSLCertVerificationError):
                client.is_server_live()
        finally:
            client.close()


def test_plain_http_to_the_tls_port_fails_cleanly_and_the_server_stays_up(tls_server, pki):
    # 400 with the server's JSON error shape, then the connection closes.
    r = requests.get(f"http://{tls_server.addr}/v2/health/ready", timeout=30)
    assert r.status_code == 400
    assert r.json() == {"error": "this port speaks HTTPS: use https:// to reach it"}
    assert r.headers["Connection"] == "close"
    # tritonclient pointed at the port without ssl=True gets the same 400 as an error.
    client = httpclient.InferenceServerClient(url=tls_server.addr, network_timeout=30.0)
    try:
        with pytest.raises(InferenceServerException) as raised:
            client.get_server_metadata()
        assert str(raised.value) == "[400] this port speaks HTTPS: use https:// to reach it"
    finally:
        client.close()
    assert tls_server.proc.poll() is None, tls_server.log()
    r = requests.get(f"https://{tls_server.addr}/v2/health/ready", timeout=30,
                     verify=str(pki / "ca.pem"))
    assert r.status_code == 200


def test_mutual_tls_required_serves_the_client_certificate_only(mtls_server, pki, test_rows,
                                                                reference):
    x, _ = test_rows
    with_cert = httpclient.InferenceServerClient(
        url=mtls_server.addr, ssl=True, ssl_context_factory=_trusting(pki / "ca.pem"),
        ssl_options={"certfile": str(pki / "client.pem"), "keyfile": str(pki / "client.key")},
        network_timeout=30.0)
    try:
        batch = np.ascontiguousarray(x[:5])
        _check(_infer(with_cert, batch), batch, reference)
    finally:
        with_cert.close()

    without = httpclient.InferenceServerClient(url=mtls_server.addr, ssl=True,
                                               ssl_context_factory=_trusting(pki / "ca.pem"),
                                               network_timeout=30.0)
    try:
        # TLS 1.3: the server's refusal arrives after the client's handshake, as an alert
        # (ssl.SSLError) or a closed connection.
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            without.is_server_live()
    finally:
        without.close()
    assert mtls_server.proc.poll() is None, mtls_server.log()


def test_sigterm_finishes_an_in_flight_https_request(pki, test_rows, reference):
    """Graceful shutdown over TLS: a request whose body is still arriving when SIGTERM comes
    is answered (onnxruntime's values), then the server exits 0."""
    server = TlsServer(pki, [])
    try:
        server.wait_ready(None)
        x, _ = test_rows
        row = np.ascontiguousarray(x[:1])
        body = json.dumps({"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32",
                                       "data": row.ravel().tolist()}]}).encode()
        host, port = server.addr.split(":")
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=30),
                             server_hostname=host) as s:
            s.sendall(b"POST /v2/models/%s/versions/%s/infer HTTP/1.1\r\nHost: %s\r\n"
                      b"Content-Length: %d\r\n\r\n" % (MODEL.encode(), MODEL_VERSION.encode(),
                                                     server.addr.encode(), len(body))
                      + body[:20])
            # Give the server time to read the request head before the signal (if it has not,
            # the connection is idle at SIGTERM and closes unanswered: the test fails, it
            # cannot pass wrongly).
            time.sleep(1.0)
            server.proc.terminate()
            time.sleep(0.5)
            assert server.proc.poll() is None, "exited with a request in flight"
            s.sendall(body[20:])
            raw = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                raw += chunk
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), raw[:500]
        outputs = {o["name"]: o for o in json.loads(payload)["outputs"]}
        want_label, want_prob = reference(row)
        assert outputs["label"]["data"] == want_label.ravel().tolist()
        np.testing.assert_allclose(np.array(outputs["probabilities"]["data"], dtype=np.float32),
                                   want_prob.ravel(), rtol=0, atol=ATOL)
        assert server.proc.wait(timeout=30) == 0, server.log()
    finally:
        server.stop()


def test_beyond_max_connections_a_new_tls_connection_is_closed_at_once(pki):
    """`--max-connections 2`: two TLS connections held open, a third is closed before any
    handshake; once the two close, a new one is served."""
    server = TlsServer(pki, ["--max-connections", "2"])
    try:
        host, port = server.addr.split(":")
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))

        def connect():
            return ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=30),
                                   server_hostname=host)

        # No readiness probe (its connection could still count): the first handshake that
        # succeeds is the first held connection.
        deadline = time.monotonic() + READY_TIMEOUT_S
        held = []
        while not held:
            assert time.monotonic() < deadline, f"no TLS handshake:\n{server.log()}"
            try:
                held.append(connect())
            except (ssl.SSLError, ConnectionError, OSError):
                time.sleep(0.2)
        held.append(connect())
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            held.append(connect())
        assert len(held) == 2
        for s in held:
            s.close()
        ok = False
        while time.monotonic() < deadline and not ok:
            try:
                r = requests.get(f"https://{server.addr}/v2/health/ready", timeout=5,
                                 verify=str(pki / "ca.pem"))
                ok = r.status_code == 200
            except requests.RequestException:
                time.sleep(0.2)
        assert ok, "no connection served after the held ones closed"
    finally:
        server.stop()


def test_beyond_max_connections_per_client_a_new_tls_connection_is_closed_at_once(pki):
    """`--max-connections-per-client 2` (the listener's cap left at 4096): a third TLS
    connection from the same client is closed before any handshake, and counted in
    `nightingale_http_connections_refused_total`; once one of the two closes, a new one is
    served."""
    server = TlsServer(pki, ["--max-connections-per-client", "2"])
    try:
        host, port = server.addr.split(":")
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))

        def connect():
            return ctx.wrap_socket(socket.create_connection((host, int(port)), timeout=30),
                                   server_hostname=host)

        deadline = time.monotonic() + READY_TIMEOUT_S
        held = []
        while not held:
            assert time.monotonic() < deadline, f"no TLS handshake:\n{server.log()}"
            try:
                held.append(connect())
            except (ssl.SSLError, ConnectionError, OSError):
                time.sleep(0.2)
        held.append(connect())
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            held.append(connect())
        assert len(held) == 2
        held.pop().close()
        ok = None
        while time.monotonic() < deadline and ok is None:
            try:
                r = requests.get(f"https://{server.addr}/metrics", timeout=5,
                                 verify=str(pki / "ca.pem"))
                ok = r
            except requests.RequestException:
                time.sleep(0.2)
        assert ok is not None and ok.status_code == 200, "no connection served after one closed"
        refused = [line for line in ok.text.splitlines()
                   if line.startswith("nightingale_http_connections_refused_total")
                   and 'reason="per_client"' in line and 'listener="tls"' in line]
        assert refused and float(refused[0].split()[-1]) >= 1, ok.text[-2000:]
        for s in held:
            s.close()
    finally:
        server.stop()


def test_a_client_certificate_is_checked_again_on_each_request(pki, tmp_path):
    """A client certificate was checked once, at the handshake: a keep-alive connection kept
    its identity past the certificate's expiry, and past a reload (SIGHUP) that replaced the
    client CAs, so a revoked CA's clients went on being served (a review's finding). Now the
    chain is verified again against the CAs in service once they were reloaded, or once a
    certificate of it reached its notAfter: 401 on the open connection where it no longer
    verifies (a new handshake is refused too), served on where it does (a CA added beside
    its own)."""
    import datetime
    import signal

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    expires = now + datetime.timedelta(seconds=6)
    short = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "short-lived")]))
             .issuer_name(ca_cert.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(expires)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
             .sign(ca_key, hashes.SHA256()))
    (tmp_path / "short.pem").write_bytes(short.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "short.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    client_ca = tmp_path / "client-ca.pem"
    client_ca.write_bytes((pki / "ca.pem").read_bytes())
    server = TlsServer(pki, ["--tls-client-ca", str(client_ca), "--tls-client-auth", "required"])
    long_lived = (str(pki / "client.pem"), str(pki / "client.key"))
    server.wait_ready(long_lived)
    url = f"https://{server.addr}/v2/models/{MODEL}"

    def session(cert) -> requests.Session:
        s = requests.Session()
        # Not from the environment: REQUESTS_CA_BUNDLE would replace the session's CA.
        s.trust_env = False
        s.cert, s.verify = cert, str(pki / "ca.pem")
        return s

    try:
        expiring = session((str(tmp_path / "short.pem"), str(tmp_path / "short.key")))
        assert expiring.get(url, timeout=10).status_code == 200
        wait = (expires - datetime.datetime.now(datetime.timezone.utc)).total_seconds() + 1.5
        assert 0 < wait < 30
        time.sleep(wait)
        r = expiring.get(url, timeout=10)  # the same connection
        assert r.status_code == 401, r.text
        assert "has expired since the connection was made" in r.json()["error"], r.text

        kept = session(long_lived)
        assert kept.get(url, timeout=10).status_code == 200

        def reload(pem: bytes, times: int) -> None:
            client_ca.write_bytes(pem)
            server.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while server.log().count("client CAs reloaded") < times:
                assert time.monotonic() < deadline, server.log()
                time.sleep(0.1)

        # Another CA added beside the client's: still trusted, served on.
        reload((pki / "ca.pem").read_bytes() + (pki / "other-ca.pem").read_bytes(), 1)
        assert kept.get(url, timeout=10).status_code == 200
        # The client's CA removed: refused on the open connection.
        reload((pki / "other-ca.pem").read_bytes(), 2)
        r = kept.get(url, timeout=10)  # the same connection
        assert r.status_code == 401, r.text
        assert "no longer trusted by the client CAs in service" in r.json()["error"], r.text
        with pytest.raises(requests.exceptions.SSLError):
            session(long_lived).get(url, timeout=10)
    finally:
        server.stop()
