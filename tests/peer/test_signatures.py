"""Bundle signatures against the real `minisign` tool (Debian's minisign 0.11, C, libsodium):
what Nightingale signs verifies with minisign, and what minisign signs verifies with
Nightingale, through `models check` and through a running server's repository index.
"""

from __future__ import annotations

import base64

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from conftest import REPO, _free_port, wait_ready

DEMO_PUB = REPO / "keys" / "demo" / "nightingale-demo.pub"
BUNDLES = REPO / "models" / "bundles"
MINISIGN = shutil.which("minisign")


def _binary() -> Path:
    binary = Path(os.environ.get("NIGHTINGALE_BIN", "target/debug/nightingale"))
    return binary if binary.is_absolute() else REPO / binary


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


@pytest.fixture(scope="module")
def minisign() -> str:
    if MINISIGN is None:
        pytest.fail("the minisign tool is not installed (apt-get install minisign)", pytrace=False)
    return MINISIGN


def _key_pair(minisign: str, folder: Path, name: str) -> tuple[Path, Path]:
    pub, sec = folder / f"{name}.pub", folder / f"{name}.key"
    r = _run([minisign, "-G", "-W", "-p", str(pub), "-s", str(sec)])
    assert r.returncode == 0, r.stdout + r.stderr
    return pub, sec


def _key_id(pub: Path) -> str:
    """The key id as 16 hex digits, from the key itself (bytes 2..10, little-endian): the
    comment minisign writes drops leading zeros (`BFF2D8B0A72CA45` for 0BFF2D8B0A72CA45)."""
    raw = base64.b64decode(pub.read_text().splitlines()[1].strip())
    return f"{int.from_bytes(raw[2:10], 'little'):016X}"


@pytest.mark.parametrize("bundle", sorted(p.name for p in BUNDLES.iterdir() if (p / "bundle.toml").is_file()))
def test_minisign_verifies_the_shipped_signatures(minisign, bundle):
    r = _run([minisign, "-V", "-p", str(DEMO_PUB), "-m", str(BUNDLES / bundle / "bundle.toml")])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Trusted comment: nightingale bundle {bundle}" in r.stdout


def test_minisign_verifies_what_models_sign_writes(minisign, tmp_path):
    shutil.copytree(BUNDLES / "pima-diabetes", tmp_path / "pima-diabetes")
    (tmp_path / "pima-diabetes" / "bundle.toml.minisig").unlink()
    pub, sec = _key_pair(minisign, tmp_path, "ours")
    r = _run([str(_binary()), "models", "sign", "--key", str(sec), str(tmp_path / "pima-diabetes")])
    assert r.returncode == 0, r.stdout + r.stderr
    assert _key_id(pub) in r.stdout
    manifest = tmp_path / "pima-diabetes" / "bundle.toml"
    r = _run([minisign, "-V", "-p", str(pub), "-m", str(manifest)])
    assert r.returncode == 0, r.stdout + r.stderr
    # Edit the manifest: minisign refuses it too.
    manifest.write_text(manifest.read_text().replace('description = "', 'description = "x', 1))
    r = _run([minisign, "-V", "-p", str(pub), "-m", str(manifest)])
    assert r.returncode != 0


def _signed_by_minisign(minisign: str, tmp_path: Path, legacy: bool = False) -> tuple[Path, Path]:
    repo = tmp_path / "repo"
    shutil.copytree(BUNDLES / "pima-diabetes", repo / "pima-diabetes")
    pub, sec = _key_pair(minisign, tmp_path, "theirs")
    manifest = repo / "pima-diabetes" / "bundle.toml"
    cmd = [minisign, "-S", "-s", str(sec), "-m", str(manifest)]
    if legacy:
        cmd.insert(2, "-l")
    r = _run(cmd)
    assert r.returncode == 0, r.stdout + r.stderr
    return repo, pub


def test_models_check_verifies_a_minisign_signature(minisign, tmp_path):
    repo, pub = _signed_by_minisign(minisign, tmp_path)
    bundle = repo / "pima-diabetes"
    r = _run([str(_binary()), "models", "check", "--trusted-key", str(pub), "--require-signatures", str(bundle)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"signature by trusted key {_key_id(pub)} verified" in r.stdout
    # Trusting only the demo key: refused, naming the signer's key id.
    r = _run([str(_binary()), "models", "check", "--trusted-key", str(DEMO_PUB), "--require-signatures", str(bundle)])
    assert r.returncode == 1
    assert "not a trusted key" in r.stdout and _key_id(pub) in r.stdout
    # An edited description breaks the signature, whatever the trust settings.
    manifest = bundle / "bundle.toml"
    manifest.write_text(manifest.read_text().replace('description = "', 'description = "x', 1))
    r = _run([str(_binary()), "models", "check", "--trusted-key", str(pub), str(bundle)])
    assert r.returncode == 1
    assert "does not verify" in r.stdout and "pima-diabetes" in r.stdout


def test_a_legacy_minisign_signature_is_refused_with_a_reason(minisign, tmp_path):
    repo, pub = _signed_by_minisign(minisign, tmp_path, legacy=True)
    r = _run([str(_binary()), "models", "check", "--trusted-key", str(pub), str(repo / "pima-diabetes")])
    assert r.returncode == 1
    assert "legacy (not prehashed)" in r.stdout, r.stdout
    # refused as one whatever the key: without trusting it too (it was listed as untrusted
    # and would load where signatures are not required)
    r = _run([str(_binary()), "models", "check", str(repo / "pima-diabetes")])
    assert r.returncode == 1 and "legacy (not prehashed)" in r.stdout, r.stdout


def test_a_server_requiring_signatures_serves_only_trusted_bundles(minisign, tmp_path):
    repo, pub = _signed_by_minisign(minisign, tmp_path)
    # A second bundle, signed by the demo key, which this server does not trust.
    shutil.copytree(BUNDLES / "icu-mortality", repo / "icu-mortality")
    port = _free_port()
    log = tmp_path / "server.log"
    cmd = [str(_binary()), "serve", "--repository", str(repo), "--http-addr", f"127.0.0.1:{port}",
           "--data-dir", str(tmp_path / "data"), "--trusted-key", str(pub), "--require-signatures"]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_ready(proc, f"127.0.0.1:{port}", log)
        index = requests.post(f"http://127.0.0.1:{port}/v2/repository/index", timeout=10).json()
        rows = {row["name"]: row for row in index}
        assert rows["pima-diabetes"]["state"] == "READY", rows
        assert rows["icu-mortality"]["state"] == "UNAVAILABLE", rows
        reason = rows["icu-mortality"]["reason"]
        assert "not a trusted key" in reason and _key_id(DEMO_PUB) in reason, reason
        assert "icu-mortality" in reason
        r = requests.get(f"http://127.0.0.1:{port}/v2/models/icu-mortality/ready", timeout=10)
        assert r.status_code != 200
        # CDS Hooks discovery describes services (and asks for prefetch) from verified
        # manifests only: the untrusted bundle gets no service (it used to be read unchecked).
        services = requests.get(f"http://127.0.0.1:{port}/cds-services", timeout=10).json()
        ids = {s["id"] for s in services["services"]}
        assert "nightingale-pima-diabetes" in ids, ids
        assert "nightingale-icu-mortality" not in ids, ids
    finally:
        proc.terminate()
        proc.wait(timeout=20)
