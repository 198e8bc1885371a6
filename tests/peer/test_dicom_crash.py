"""kill -9 in the middle of a storescu storm: every acknowledged instance survives.

Four dcmtk `storescu` processes (one association each) send 600 instances (copies of pydicom's
and pydicom-data's CT and MR files, each with a fresh SOP Instance UID) to
`nightingale serve --dicom-port`. Once the spool's index lists at least KILL_AFTER instances,
the server gets SIGKILL. What storescu reports as "Received Store Response (Success)" for a
file is the list of acknowledged instances (the SCU's log, not Nightingale's). The server is
then restarted on the same data folder, and:

- every acknowledged instance is in the index, its `.dcm` file is there, parses with pydicom
  and its data set equals the one sent (element by element);
- nothing half-written is indexed: every indexed file parses and equals the file sent under
  its SOP Instance UID; every `.dcm` file in the spool has its row; the temporary folder is
  empty after the restart;
- the restarted server takes the whole storm again (already stored instances as duplicates),
  and then every instance sent is indexed.

Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from dicom_support import binary as _binary, free_port as _free_port, spool_index, tool as _tool  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
STORM_TIMEOUT_S = 300.0
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}
PROCESSES = 4
PER_PROCESS = 150
KILL_AFTER = 120
SOURCES = [
    "693_UNCI.dcm",  # pydicom-data: CT 512x512 (~0.5 MB), so a kill often lands mid-write
    "CT_small.dcm",  # pydicom
    "MR_small.dcm",  # pydicom
]


class Server:
    """`serve --dicom-port` on a data folder that outlives the process."""

    def __init__(self, work: Path, data: Path, port: int, name: str):
        self.port = port
        self.data = data
        self.spool = data / "spool"
        self.stderr = work / f"{name}.log"
        repo = work / "models"
        repo.mkdir(exist_ok=True)
        cmd = [str(_binary()), "serve", "--repository", str(repo),
               "--http-addr", f"127.0.0.1:{_free_port()}", "--data-dir", str(data),
               "--dicom-port", str(port)]
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited ({self.proc.returncode}):\n{self.log()}", pytrace=False)
            if "listening (DICOM)" in self.log():
                return
            time.sleep(0.1)
        self.kill()
        pytest.fail(f"no `listening (DICOM)` within {START_TIMEOUT_S} s:\n{self.log()}", pytrace=False)

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def index(self) -> dict[str, dict]:
        return spool_index(self.spool)

    def indexed_count(self) -> int:
        try:
            db = sqlite3.connect(f"file:{self.spool / 'index.sqlite3'}?mode=ro", uri=True,
                                 timeout=1)
            try:
                return db.execute("SELECT count(*) FROM instances").fetchone()[0]
            finally:
                db.close()
        except sqlite3.Error:
            return 0


def _equal_datasets(sent: pydicom.Dataset, stored: pydicom.Dataset) -> list[str]:
    """Tags whose values differ, both ways (as in test_dicom_scp.py). Data Set Trailing
    Padding (FFFC,FFFC) is dropped by storescu before sending, so it is not compared."""
    diffs = []
    for elem in sent:
        if elem.tag == 0xFFFCFFFC:
            continue
        if elem.tag not in stored or stored[elem.tag].value != elem.value:
            diffs.append(str(elem.tag))
    for elem in stored:
        if elem.tag not in sent:
            diffs.append(f"extra {elem.tag}")
    return diffs


def _make_storm(out: Path) -> dict[str, Path]:
    """PROCESSES folders of PER_PROCESS files; SOP Instance UID -> file sent."""
    sources = []
    for name in SOURCES:
        path = get_testdata_file(name)
        assert path is not None, f"{name}: install pydicom and pydicom-data"
        sources.append(pydicom.dcmread(path))
    sent = {}
    for p in range(PROCESSES):
        folder = out / f"part{p}"
        folder.mkdir(parents=True)
        for i in range(PER_PROCESS):
            ds = sources[(p + i) % len(sources)]
            uid = generate_uid()
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            path = folder / f"{i:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            sent[uid] = path
    return sent


def _storescu(port: int, folder: Path, log: Path) -> subprocess.Popen:
    # -nh: keep going after a failed store; +sd: the files of a folder, one association.
    with open(log, "wb") as out:
        return subprocess.Popen([_tool("storescu"), "-v", "-nh", "-aet", "STORMSCU",
                                 "-aec", "NIGHTINGALE", "127.0.0.1", str(port), "+sd",
                                 str(folder)],
                                stdout=out, stderr=subprocess.STDOUT, env=PEER_ENV)


SENDING = re.compile(r"Sending file: (.+?)\s*$")


def _acknowledged(log: Path) -> set[Path]:
    """Files storescu reports as stored: a "Sending file" line, then that request's
    "Received Store Response (Success)"."""
    acked, current = set(), None
    for line in log.read_text(errors="replace").splitlines():
        m = SENDING.search(line)
        if m:
            current = Path(m.group(1))
        elif "Received Store Response (Success)" in line and current is not None:
            acked.add(current)
            current = None
    return acked


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"storescu still running after {timeout} s", pytrace=False)


def test_kill_9_mid_storm_keeps_every_acknowledged_instance(tmp_path):
    work = Path(tempfile.mkdtemp(prefix="nightingale-dicom-crash-"))
    data = work / "data"
    port = _free_port()
    sent = _make_storm(work / "storm")
    by_path = {path: uid for uid, path in sent.items()}
    total = len(sent)
    assert total >= 500

    server = Server(work, data, port, "first")
    try:
        logs = [work / f"storescu{p}.log" for p in range(PROCESSES)]
        procs = [_storescu(port, work / "storm" / f"part{p}", logs[p]) for p in range(PROCESSES)]
        deadline = time.monotonic() + STORM_TIMEOUT_S
        while server.indexed_count() < KILL_AFTER:
            if time.monotonic() > deadline or server.proc.poll() is not None:
                for p in procs:
                    p.kill()
                pytest.fail(f"{KILL_AFTER} instances not indexed within {STORM_TIMEOUT_S} s:\n"
                            f"{server.log()[-4000:]}", pytrace=False)
            time.sleep(0.02)
        server.kill()
        _wait_all(procs, STORM_TIMEOUT_S)
    finally:
        server.stop()

    acked_paths = set().union(*(_acknowledged(log) for log in logs))
    acked = {by_path[p] for p in acked_paths}
    print(f"acknowledged before SIGKILL: {len(acked)} of {total}")
    assert len(acked) >= KILL_AFTER // 2, "storescu's log lists the successes"
    assert len(acked) < total, "the server was killed in the middle of the storm"
    leftovers = list((data / "spool" / "tmp").iterdir())
    print(f"temporary files left by the kill: {len(leftovers)}")

    server = Server(work, data, port, "second")
    try:
        index = server.index()
        # Every acknowledged instance: indexed, its file there, equal to what was sent.
        missing = sorted(uid for uid in acked if uid not in index)
        assert missing == [], f"{len(missing)} acknowledged instances lost"
        for uid, row in index.items():
            # Nothing half-written is indexed: every row's file is one of the files sent.
            assert uid in sent, f"indexed instance {uid} was never sent"
            stored_path = server.spool / row["path"]
            assert stored_path.suffix == ".dcm" and stored_path.is_file(), row["path"]
            stored = pydicom.dcmread(stored_path)
            assert stored.file_meta.MediaStorageSOPInstanceUID == uid
            diffs = _equal_datasets(pydicom.dcmread(sent[uid]), stored)
            assert diffs == [], f"{row['path']}: {diffs}"
        on_disk = {str(p.relative_to(server.spool)) for p in (server.spool / "instances").rglob("*.dcm")}
        assert on_disk == {row["path"] for row in index.values()}, "every file has its row"
        assert list((server.spool / "tmp").iterdir()) == [], "leftover temporary files discarded"
        if leftovers:
            assert "spool reconciled" in server.log()

        # The restarted server takes the whole storm again: all of it ends up stored.
        logs = [work / f"again{p}.log" for p in range(PROCESSES)]
        procs = [_storescu(port, work / "storm" / f"part{p}", logs[p]) for p in range(PROCESSES)]
        _wait_all(procs, STORM_TIMEOUT_S)
        for p, log in zip(procs, logs):
            assert p.returncode == 0, log.read_text(errors="replace")[-4000:]
        again = set().union(*(_acknowledged(log) for log in logs))
        assert len(again) == total
        assert set(server.index()) == set(sent)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
