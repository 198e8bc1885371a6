"""Helpers shared by the DICOM peer tests (test_dicom_*.py): a free loopback port, the
server binary under test, and a dcmtk tool by name."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary() -> Path:
    """The Nightingale binary (NIGHTINGALE_BIN, default target/debug/nightingale)."""
    path = Path(os.environ.get("NIGHTINGALE_BIN", "target/debug/nightingale"))
    if not path.is_absolute():
        path = REPO / path
    if not path.exists():
        pytest.fail(f"Nightingale binary not found at {path} (cargo build)", pytrace=False)
    return path


def tool(name: str) -> str:
    """A dcmtk command-line tool."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: install Debian's dcmtk (scripts/test.sh does)", pytrace=False)
    return path


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s (each wait bounded)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def spool_index(spool: Path) -> dict[str, dict]:
    """The spool's SQLite index, read-only, by SOP Instance UID."""
    db = sqlite3.connect(f"file:{spool / 'index.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM instances").fetchall()
    finally:
        db.close()
    return {r["sop_instance_uid"]: dict(r) for r in rows}
