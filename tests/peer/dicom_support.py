"""Helpers shared by the DICOM peer tests (test_dicom_*.py): a free loopback port, the
server binary under test, and a dcmtk tool by name."""

from __future__ import annotations

import os
import shutil
import socket
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
