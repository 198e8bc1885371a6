"""Retention and purges while the DICOM pipeline has work, and results a PACS was down for
(a review's findings): a purge is in the audit trail, whoever ran it; what it deleted stays
deleted at the next start; a job whose instances a purge took says so; the data folder is
its owner's alone; result objects given up are listed and sent again once the PACS is back.

Peers: dcmtk's storescu (the modality) and storescp (the PACS)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from dicom_support import (RESULT_TIMEOUT_S, Server, StoreScp, binary, free_port, long_series,
                           spool_index, stop, store, wait_for, with_new_uids)


@pytest.fixture
def work():
    d = Path(tempfile.mkdtemp(prefix="nightingale-retention-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary()), *args], capture_output=True, text=True, timeout=120)


def audit_records(server: Server) -> list[dict]:
    path = server.data / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def result_objects(server: Server, study: str) -> list[dict]:
    """The study's result objects, as the results API lists them (none before it knows it)."""
    r = server.results(study)
    return [o for s in (r or {}).get("series", []) for j in s["jobs"] for o in j["objects"]]


def all_in(server: Server, study: str, delivery: str) -> bool:
    """Whether the study's SR and SC are both in this delivery state."""
    objects = result_objects(server, study)
    return len(objects) == 2 and all(o["delivery"] == delivery for o in objects)


def delivered(server: Server, study: str) -> bool:
    return all_in(server, study, "sent")


def test_a_purge_is_audited_and_what_it_deleted_stays_deleted(work):
    # The data folder made beforehand as a package would (0755): narrowed to its owner at
    # start, and the results store with it (they were readable by every user).
    (work / "data").mkdir(mode=0o755)
    os.chmod(work / "data", 0o755)
    pacs = StoreScp(work)
    server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}")
    try:
        for path in [server.data, server.data / "results"]:
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
        assert stat.S_IMODE((server.data / "results" / "results.sqlite3").stat().st_mode) == 0o600
        source = work / "ct.dcm"
        ds = with_new_uids(get_testdata_file("CT_small.dcm"), source)
        study = str(ds.StudyInstanceUID)
        store(server.port, [source])
        wait_for(lambda: delivered(server, study), RESULT_TIMEOUT_S, "the SR and SC delivered")
        held = spool_index(server.data / "spool")
        assert len(held) == 3  # the CT, and the SR and SC kept for QIDO-RS
        # An operator's purge beside the running server: the spool only (the results store
        # still names the SR and SC it made).
        out = cli("spool", "purge", "--spool", str(server.data / "spool"), "--older-than", "1ns",
                  "--force")
        assert out.returncode == 0, out.stderr
        assert spool_index(server.data / "spool") == {}
        # The server writes its record (it holds the trail) within seconds.
        study_sha = hashlib.sha256(study.encode()).hexdigest()
        records = wait_for(
            lambda: (r := [x for x in audit_records(server) if x["kind"] == "spool-purge"])
            and len(r) >= 2 and r, 30, "the purge's records in the audit trail")
        [purge] = [r for r in records if r["detail"].startswith("event=purged ")]
        assert purge["actor"].startswith("operator"), purge
        assert " instances=3 " in purge["detail"] and " studies=1" in purge["detail"], purge
        assert "command=spool-purge older_than=1ns force=true" in purge["detail"], purge
        [deleted] = [r for r in records if r["detail"].startswith("event=study-deleted ")]
        assert deleted["detail"] == f"event=study-deleted instances=3 study_sha256={study_sha}"
        assert deleted["request_id"] == purge["request_id"]
        # Recorded once: the spool forgets it once audited.
        time.sleep(6)
        assert len([x for x in audit_records(server) if x["kind"] == "spool-purge"]) == 2
        # A restart does not put the purged SR and SC back (they came back, received anew).
        stop(server.proc)
        server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}")
        assert spool_index(server.data / "spool") == {}
        assert "result objects added to the spool" not in server.log()
        check = cli("audit", "verify", str(server.data / "audit" / "audit.jsonl"))
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        stop(server.proc)
        stop(pacs.proc)


def test_a_job_whose_instances_are_purged_while_it_runs_fails_purged(work):
    pacs = StoreScp(work)
    server = Server(work, f"STORESCP@127.0.0.1:{pacs.port}")
    try:
        study, files = long_series(work, 200)
        store(server.port, files)
        wait_for(lambda: (r := server.results(study)) and r["series"][0]["jobs"]
                 and r["series"][0]["jobs"][0]["state"] == "processing",
                 RESULT_TIMEOUT_S, "the job to run")
        out = cli("spool", "purge", "--spool", str(server.data / "spool"), "--older-than", "1ns",
                  "--force")
        assert out.returncode == 0, out.stderr
        job = wait_for(
            lambda: (r := server.results(study)) and (j := r["series"][0]["jobs"][0])
            and j["state"] == "failed" and j, RESULT_TIMEOUT_S, "the job to fail")
        # It says the instances were purged, not that a file was unreadable.
        assert job["reason"].startswith("purged: "), job
        assert "deleted from the spool while it ran" in job["reason"], job
        assert not pacs.files()
    finally:
        stop(server.proc)
        stop(pacs.proc)


def test_results_given_up_are_listed_and_sent_again_once_the_pacs_is_back(work):
    port = free_port()  # the PACS is down: nothing listens there yet
    server = Server(work, f"STORESCP@127.0.0.1:{port}",
                    extra=("--results-retry-secs", "0.2", "--results-max-attempts", "2"))
    pacs = None
    try:
        source = work / "ct.dcm"
        ds = with_new_uids(get_testdata_file("CT_small.dcm"), source)
        study = str(ds.StudyInstanceUID)
        store(server.port, [source])

        def dead():
            return all_in(server, study, "dead")

        wait_for(dead, RESULT_TIMEOUT_S, "both objects given up")
        out = cli("results", "list", "--data-dir", str(server.data))
        assert out.returncode == 0, out.stderr
        lines = [line for line in out.stdout.splitlines() if line.startswith("object ")]
        assert len(lines) == 2 and all("\tdead\t" in line and study in line for line in lines), out.stdout
        out = cli("results", "list", "--state", "dead", "--data-dir", str(server.data))
        assert len([x for x in out.stdout.splitlines() if x.startswith("object ")]) == 2
        out = cli("results", "list", "--state", "retrying", "--data-dir", str(server.data))
        assert out.stdout.strip() == "nothing listed", out.stdout
        # Another study, or another destination: nothing to send.
        out = cli("results", "resend", "--study", "1.2.3", "--data-dir", str(server.data))
        assert out.returncode == 1 and "nothing to send again" in out.stderr, out.stderr
        # Sent again while the PACS is still down: given up again, the dead-letter copies
        # whole (copying each onto itself truncated it: the object was lost, a re-attack's
        # finding).
        letters = sorted((server.data / "results" / "dead-letter").iterdir())
        sizes = [p.stat().st_size for p in letters]
        assert len(letters) == 2 and all(sizes), sizes
        out = cli("results", "resend", "--data-dir", str(server.data))
        assert out.returncode == 0 and "queued 2" in out.stdout, out.stdout + out.stderr
        wait_for(lambda: not dead(), 30, "the objects tried again")
        wait_for(dead, RESULT_TIMEOUT_S, "both objects given up again")
        assert [p.stat().st_size for p in letters] == sizes
        # The PACS is back: sent again, once each.
        pacs = StoreScp(work, port=port)
        out = cli("results", "resend", "--study", study, "--data-dir", str(server.data))
        assert out.returncode == 0, out.stderr
        assert "queued 2 result object(s)" in out.stdout, out.stdout
        wait_for(lambda: delivered(server, study), RESULT_TIMEOUT_S, "the SR and SC sent again")
        assert len(pacs.files()) == 2
        out = cli("results", "list", "--state", "dead", "--data-dir", str(server.data))
        assert out.stdout.strip() == "nothing listed", out.stdout
        out = cli("results", "resend", "--data-dir", str(server.data))
        assert out.returncode == 1 and "nothing to send again" in out.stderr
        # The operator's commands are in the audit trail (the server writes them), once each.
        study_sha = hashlib.sha256(study.encode()).hexdigest()
        first, second = wait_for(
            lambda: len(r := [r for r in audit_records(server)
                              if r["kind"] == "operator-command"]) == 2 and r,
            30, "the resends' records in the audit trail")
        assert all(c["actor"].startswith("operator") for c in (first, second)), (first, second)
        assert first["detail"].endswith("command=results-resend study_sha256=* destination=* objects=2")
        assert second["detail"].endswith(
            f"command=results-resend study_sha256={study_sha} destination=* objects=2"), second
        time.sleep(6)
        assert len([r for r in audit_records(server) if r["kind"] == "operator-command"]) == 2
    finally:
        stop(server.proc)
        if pacs:
            stop(pacs.proc)


def test_results_wait_for_the_audit_trail_before_they_go(work):
    """A re-attack's finding: with the audit trail unwritable (its SQLite database locked by
    another process), results went to the PACS with no record at all. An object now goes
    only once its `sending` record is written; meanwhile it waits, not charged an attempt."""
    port = free_port()  # the PACS is down at first
    server = Server(work, f"STORESCP@127.0.0.1:{port}",
                    extra=("--audit-store", "sqlite", "--results-retry-secs", "0.5"))
    pacs = None
    trail = server.data / "audit.sqlite3"
    try:
        source = work / "ct.dcm"
        ds = with_new_uids(get_testdata_file("CT_small.dcm"), source)
        study = str(ds.StudyInstanceUID)
        store(server.port, [source])

        def objects():
            return result_objects(server, study)

        wait_for(lambda: len(objects()) == 2 and all(o["attempts"] >= 1 for o in objects()),
                 RESULT_TIMEOUT_S, "a failed attempt for each object")
        lock = sqlite3.connect(trail, isolation_level=None, timeout=10)
        lock.execute("BEGIN IMMEDIATE")  # the trail cannot be written from now on
        try:
            pacs = StoreScp(work, port=port)

            def held() -> bool:
                # The results store itself: its API is refused (503) while reads cannot be
                # audited.
                db = sqlite3.connect(f"file:{server.data / 'results' / 'results.sqlite3'}?mode=ro",
                                     uri=True, timeout=10)
                try:
                    rows = db.execute("SELECT delivery, last_error FROM objects").fetchall()
                finally:
                    db.close()
                return len(rows) == 2 and all(
                    d == "pending" and "audit trail cannot be written" in (e or "") for d, e in rows)

            wait_for(held, 60, "the objects held for the audit trail")
            assert pacs.files() == []
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        wait_for(lambda: delivered(server, study), RESULT_TIMEOUT_S, "the SR and SC delivered")
        assert len(pacs.files()) == 2
        db = sqlite3.connect(f"file:{trail}?mode=ro", uri=True, timeout=10)
        try:
            sent = [json.loads(r) for (r,) in db.execute("SELECT record FROM audit_log")]
        finally:
            db.close()
        sent = [r for r in sent if r["kind"] == "dicom-result-sent"]
        for event in ("sending", "delivered"):
            assert len([r for r in sent if f"event={event} " in r["detail"]]) == 2, sent
    finally:
        stop(server.proc)
        if pacs:
            stop(pacs.proc)
