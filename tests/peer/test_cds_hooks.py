"""CDS Hooks 2.0 against the running server, as an EHR calls it: discovery, patient-view
requests shaped as the specification's example with FHIR R4 prefetch (validated by
fhir.resources), JWTs signed with PyJWT (ES384, RS384) against `--cds-trust`, every kind of
bad token, the fetch of missing prefetch from a FHIR server started here (answering, slow,
failing), and feedback counted in the metrics. Expected NEWS2 scores come from
news2_reference.py (the RCP 2017 chart written out independently of the Rust code)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from cds_support import (SNOMED, Ehr, Server, condition, patient, patient_view, searchset,
                         vitals)
from dicom_support import stop
from news2_reference import news2

SERVICE = "nightingale-news2"
PID = "1288992"


@pytest.fixture(scope="module")
def work():
    d = Path(tempfile.mkdtemp(prefix="nightingale-cds-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def ehr(work):
    return Ehr(work)


@pytest.fixture(scope="module")
def server(work, ehr):
    s = Server(work, ehr)
    yield s
    stop(s.proc)


def ago(minutes: int) -> str:
    return (datetime.now(timezone.utc) - timedelta(minutes=minutes)).isoformat(timespec="seconds")


def adult() -> dict:
    return patient(PID, "1950-03-14")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict, claims: dict, secret: bytes | None) -> str:
    """A token PyJWT refuses to make: `alg: none`, or HS256 keyed with a public key."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    if secret is None:
        return signing_input + "."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def test_discovery_is_open_and_offers_news2_on_patient_view(server):
    status, body = server.get("/cds-services")
    assert status == 200, body
    news2_services = [s for s in body["services"] if "news2" in s["id"]]
    assert news2_services, body
    s = news2_services[0]
    assert s["hook"] == "patient-view"
    assert s["description"]
    assert "{{context.patientId}}" in s["prefetch"]["patient"]


CASES = [
    # rr, spo2, oxygen, sbp, hr, alert, temp (°C unless °F given)
    (16, 97, False, 125, 72, True, 36.8),     # 0: low
    (21, 95, False, 112, 91, True, 38.1),     # every edge of a 1 or 2
    (8, 96, False, 150, 80, True, 37.0),      # a single 3: low-medium
    (24, 93, True, 100, 111, True, 39.1),     # oxygen, medium/high
    (25, 91, True, 90, 131, False, 35.0),     # everything red
    (12, 94, False, 219, 51, True, 36.1),
    (20, 92, False, 220, 40, True, 38.0),
]


@pytest.mark.parametrize("case", CASES)
def test_news2_cards_match_the_chart(server, ehr, case):
    rr, spo2, oxygen, sbp, hr, alert, temp = case
    prefetch = {"patient": adult(),
                "vitals": searchset(vitals(PID, ago(20), rr, spo2, oxygen, sbp, hr, alert, temp)),
                "conditions": searchset([])}
    status, body = server.call(SERVICE, patient_view(PID, prefetch), ehr)
    assert status == 200, body
    [card] = body["cards"]
    total, band, subs = news2(rr, spo2, oxygen, sbp, hr, alert, temp)
    assert card["summary"].startswith(f"NEWS2 {total} "), (card["summary"], subs)
    want = {"low": "info", "low-medium": "warning", "medium": "warning", "high": "critical"}[band]
    assert card["indicator"] == want, (card, band)
    assert len(card["summary"]) < 140
    assert "NEWS2" in card["source"]["label"]
    uuid.UUID(card["uuid"])


def test_the_worked_example_script_gets_its_card(work):
    """scripts/cds_example.py, the README's worked CDS Hooks call (keys, a signed JWT, a
    patient-view request with prefetch): run as documented against a server trusting its
    JWKS, it gets the NEWS2 card the RCP chart gives its vitals."""
    import subprocess
    import sys
    from types import SimpleNamespace

    script = Path(__file__).resolve().parents[2] / "scripts" / "cds_example.py"
    keys = work / "example-ehr"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), *args], capture_output=True,
                              text=True, timeout=60)

    r = run("keys", str(keys))
    assert r.returncode == 0, r.stderr
    s = Server(work, SimpleNamespace(issuer="https://ehr.example.org",
                                     jwks_path=keys / "ehr-jwks.json"))
    try:
        r = run("call", "--url", s.base, "--key", str(keys / "ehr-key.pem"))
        assert r.returncode == 0, r.stdout + r.stderr
        [card] = json.loads(r.stdout)["cards"]
        total, band, _ = news2(24, 93, True, 100, 111, True, 39.1)
        assert card["summary"].startswith(f"NEWS2 {total} ") and band == "high", card
        assert card["indicator"] == "critical"
    finally:
        stop(s.proc)


def test_fahrenheit_and_scale_2_for_a_hypercapnic_patient(work, ehr):
    # Scale 2 needs the service told which Condition means a prescribed 88-92 % target.
    cfg = work / "scale2.toml"
    cfg.write_text(f'''
[[cds.services]]
id = "news2-scale2"
hook = "patient-view"
description = "NEWS2 with SpO2 scale 2 for hypercapnic respiratory failure"
kind = "news2"
scale2_conditions = ["{SNOMED}|65710008"]
''')
    s = Server(work, ehr, extra=("--config", str(cfg)))
    try:
        obs = vitals(PID, ago(10), 18, 95, True, 130, 80, True, 99.5, temp_unit="[degF]")
        prefetch = {"patient": adult(), "vitals": searchset(obs),
                    "conditions": searchset([condition(PID, 1, SNOMED, "65710008",
                                                       "Acute respiratory failure")])}
        status, body = s.call("news2-scale2", patient_view(PID, prefetch), ehr)
        assert status == 200, body
        [card] = body["cards"]
        total, band, subs = news2(18, 95, True, 130, 80, True, (99.5 - 32) * 5 / 9, scale2=True)
        assert card["summary"].startswith(f"NEWS2 {total} "), (card, subs)
        assert "scale 2" in card["summary"]
    finally:
        stop(s.proc)


def test_missing_vitals_and_a_child_get_info_cards(server, ehr):
    status, body = server.call(SERVICE, patient_view(PID, {"patient": adult()}), ehr)
    assert status == 200, body
    [card] = body["cards"]
    assert card["indicator"] == "info" and "missing" in card["summary"], card
    child = patient(PID, (datetime.now(timezone.utc) - timedelta(days=3650)).strftime("%Y-%m-%d"))
    prefetch = {"patient": child,
                "vitals": searchset(vitals(PID, ago(5), 16, 97, False, 125, 72, True, 36.8))}
    status, body = server.call(SERVICE, patient_view(PID, prefetch), ehr)
    assert status == 200, body
    assert "under 16" in body["cards"][0]["summary"]


def test_rs384_tokens_are_accepted(server, ehr):
    status, body = server.call(SERVICE, patient_view(PID, {"patient": adult()}), ehr, kid="rsa-1")
    assert status == 200, body


def test_every_bad_token_is_401_and_gets_no_card(server, ehr, work):
    aud = server.url(SERVICE)
    request = patient_view(PID, {"patient": adult()})
    now = int(time.time())
    stranger = Ehr(work, issuer="https://not-trusted.example.org")
    replayed = ehr.token(aud)
    assert server.request("POST", f"/cds-services/{SERVICE}", request, token=replayed)[0] == 200
    public_pem = ehr.public_pem("rsa-1")
    base = {"iss": ehr.issuer, "sub": "ehr-client", "aud": aud, "iat": now, "exp": now + 300}
    tokens = {
        "none": None,
        "expired": ehr.token(aud, iat=now - 900, exp=now - 600),
        "not yet valid": ehr.token(aud, nbf=now + 600),
        "issued in the future": ehr.token(aud, iat=now + 600, exp=now + 900),
        "wrong audience": ehr.token("http://127.0.0.1:1/cds-services/" + SERVICE),
        "another service": ehr.token(server.url("other-service")),
        "unknown issuer": stranger.token(aud),
        "unknown kid": forged_kid(ehr, aud),
        "replayed": replayed,
        "no jti": ehr.token(aud, jti=None),
        "HS256 keyed with the public key": forged(
            {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, {**base, "jti": str(uuid.uuid4())},
            public_pem),
        "alg none": forged({"alg": "none", "typ": "JWT", "kid": "ec-1"},
                           {**base, "jti": str(uuid.uuid4())}, None),
        "oversized": ehr.token(aud, padding="x" * 40_000),
        "garbage": "not.a.jwt",
    }
    for what, token in tokens.items():
        status, body = server.request("POST", f"/cds-services/{SERVICE}", request, token=token)
        assert status == 401, (what, status, body)
        assert "cards" not in body, what
    # Feedback needs a token too.
    status, _ = server.request("POST", f"/cds-services/{SERVICE}/feedback", {"feedback": []})
    assert status == 401


def forged_kid(ehr: Ehr, aud: str) -> str:
    import jwt

    key, _ = ehr.keys["ec-1"]
    now = int(time.time())
    return jwt.encode({"iss": ehr.issuer, "aud": aud, "iat": now, "exp": now + 300,
                       "jti": str(uuid.uuid4())}, key, algorithm="ES384",
                      headers={"kid": "no-such-key"})


def matches(resource: dict, path: str) -> bool:
    """Whether `resource` matches the search's `category` and `code` parameters (FHIR R4:
    a token `system|code`, a comma between alternatives), as a FHIR server filters them."""
    query = parse_qs(urlsplit(path).query)

    def codings(concepts) -> set:
        return {(c.get("system"), c.get("code")) for cc in concepts for c in cc.get("coding", [])}

    for category in query.get("category", []):
        if category not in {c for _, c in codings(resource.get("category", []))}:
            return False
    for code in query.get("code", []):
        wanted = {tuple(t.split("|", 1)) if "|" in t else (None, t) for t in code.split(",")}
        have = codings([resource.get("code", {})])
        if not any(w in have or (w[0] is None and w[1] in {c for _, c in have})
                   for w in wanted):
            return False
    return True


class Fhir(BaseHTTPRequestHandler):
    """A FHIR server for one test: what it serves and how (set on the class)."""

    mode = "answer"
    seen: list = []
    resources: dict = {}
    fail_code: str | None = None  # a search by this code is answered 503

    def do_GET(self):  # noqa: N802 (http.server's name)
        Fhir.seen.append((self.path, self.headers.get("Authorization")))
        if Fhir.mode == "fail":
            self.send_response(500)
            self.end_headers()
            return
        if Fhir.mode == "slow":
            time.sleep(3)
        if Fhir.fail_code and Fhir.fail_code in unquote(self.path):
            self.send_response(503)
            self.end_headers()
            return
        parts = self.path.split("?")[0].split("/")  # ['', 'fhir', 'Observation', ...]
        body = Fhir.resources.get(parts[2] if len(parts) > 2 else "", searchset([]))
        if body.get("type") == "searchset":
            body = searchset([e["resource"] for e in body["entry"]
                              if matches(e["resource"], self.path)])
        data = json.dumps(body).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the server under test gave up (the slow case)

    def log_message(self, *args):
        pass


@pytest.fixture
def fhir():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Fhir)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    Fhir.seen = []
    Fhir.fail_code = None
    Fhir.resources = {
        "Patient": adult(),
        "Observation": searchset(vitals(PID, ago(15), 22, 94, False, 105, 115, True, 38.5)),
        "Condition": searchset([]),
    }
    yield f"http://127.0.0.1:{httpd.server_address[1]}/fhir"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("mode", ["answer", "slow", "fail"])
def test_missing_prefetch_is_fetched_from_the_fhir_server(work, ehr, fhir, mode):
    Fhir.mode = mode
    s = Server(work, ehr, extra=("--cds-fhir-server", fhir, "--cds-fetch-timeout-ms", "500"))
    try:
        started = time.monotonic()
        status, body = s.call(SERVICE, patient_view(PID, None, fhir_server=fhir,
                                                    token="opaque-token-123"), ehr)
        elapsed = time.monotonic() - started
        assert status == 200, body
        [card] = body["cards"]
        if mode == "answer":
            total, band, _ = news2(22, 94, False, 105, 115, True, 38.5)
            assert card["summary"].startswith(f"NEWS2 {total} "), card
            assert {a for _, a in Fhir.seen} == {"Bearer opaque-token-123"}
            assert any(p.startswith(f"/fhir/Observation?patient={PID}") for p, _ in Fhir.seen)
        else:
            assert card["indicator"] == "info" and "missing" in card["summary"], card
        print(f"{mode}: answered in {elapsed * 1e3:.0f} ms")
        assert PID not in s.log()
    finally:
        stop(s.proc)


def test_a_consciousness_level_filed_outside_vital_signs_is_fetched_by_its_code(work, ehr, fhir):
    # EHRs file LOINC 67775-7 (not a FHIR vital-signs profile) under `survey`: the vitals
    # search by category never returns it, and NEWS2 was "not calculated: missing
    # Consciousness" though one was charted (a red-team finding).
    observations = vitals(PID, ago(15), 22, 94, False, 105, 115, True, 38.5)
    for o in observations:
        if o["code"]["coding"][0]["code"] == "67775-7":
            o["category"][0]["coding"][0]["code"] = "survey"
    Fhir.mode = "answer"
    Fhir.resources["Observation"] = searchset(observations)
    s = Server(work, ehr, extra=("--cds-fhir-server", fhir))
    try:
        status, body = s.call(SERVICE, patient_view(PID, None, fhir_server=fhir), ehr)
        assert status == 200, body
        [card] = body["cards"]
        total, _, _ = news2(22, 94, False, 105, 115, True, 38.5)
        assert card["summary"].startswith(f"NEWS2 {total} "), card
        searches = [p for p, _ in Fhir.seen if p.startswith("/fhir/Observation?")]
        assert any("67775-7" in unquote(p) for p in searches), searches
    finally:
        stop(s.proc)


def test_a_search_that_fails_leaves_what_it_holds_unknown(work, ehr, fhir):
    # The vitals (an Alert 30 minutes ago) are read; the consciousness search fails (503).
    # New confusion charted since would score 3: an older Alert is not scored in its place
    # (it was: "NEWS2 0 — low", a red-team finding), and the card says why.
    Fhir.mode = "answer"
    Fhir.fail_code = "67775-7"
    Fhir.resources["Observation"] = searchset(vitals(PID, ago(30), 16, 97, False, 125, 72, True, 36.8))
    s = Server(work, ehr, extra=("--cds-fhir-server", fhir))
    try:
        status, body = s.call(SERVICE, patient_view(PID, None, fhir_server=fhir), ehr)
        assert status == 200, body
        [card] = body["cards"]
        assert card["summary"] == "NEWS2 not calculated: missing Consciousness", card
        assert "was not answered, by the prefetch or by the EHR's FHIR server" in card["detail"], card
    finally:
        stop(s.proc)


def test_feedback_is_counted_per_service_and_model_version(server, ehr):
    prefetch = {"patient": adult(),
                "vitals": searchset(vitals(PID, ago(20), 16, 97, False, 125, 72, True, 36.8))}
    status, body = server.call(SERVICE, patient_view(PID, prefetch), ehr)
    assert status == 200, body
    card = body["cards"][0]["uuid"]
    before = server.metric("nightingale_cds_feedback_total", service=SERVICE, outcome="overridden")
    feedback = {"feedback": [{
        "card": card, "outcome": "overridden",
        "overrideReason": {"reason": {"system": "http://example.org/reasons", "code": "known"},
                           "userComment": "already escalated"},
        "outcomeTimestamp": datetime.now(timezone.utc).isoformat()}]}
    status, body = server.request("POST", f"/cds-services/{SERVICE}/feedback", feedback,
                                  token=ehr.token(server.url(SERVICE)))
    assert status == 200, body
    after = server.metric("nightingale_cds_feedback_total", service=SERVICE, outcome="overridden")
    assert after == before + 1
    # CDS Hooks 2.0: `aud` is the endpoint called, so the feedback endpoint's own URL is
    # accepted there too (it was 401), and only there.
    status, body = server.request("POST", f"/cds-services/{SERVICE}/feedback", feedback,
                                  token=ehr.token(server.url(SERVICE) + "/feedback"))
    assert status == 200, body
    status, body = server.request("POST", f"/cds-services/{SERVICE}",
                                  patient_view(PID, prefetch),
                                  token=ehr.token(server.url(SERVICE) + "/feedback"))
    assert status == 401, body
    assert server.metric("nightingale_cds_override_rate", service=SERVICE) > 0


def order_select(pid: str, prefetch: dict) -> dict:
    """An order-select request shaped as the CDS Hooks 2.0 specification's example: the
    clinician selected a draft order in a Bundle of draft orders."""
    draft = {
        "resourceType": "MedicationRequest", "id": "smart-MedicationRequest-103",
        "status": "draft", "intent": "order",
        "medicationCodeableConcept": {"text": "Amoxicillin 120 MG/ML / clavulanate potassium"
                                              " 8.58 MG/ML Oral Suspension",
                                      "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                                  "code": "617993"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "dosageInstruction": [{"text": "5 mL bid x 10 days",
                               "timing": {"repeat": {"frequency": 2, "period": 1,
                                                     "periodUnit": "d"}}}],
    }
    from fhir.resources.R4B.medicationrequest import MedicationRequest

    MedicationRequest.model_validate(draft)
    return {
        "hookInstance": str(uuid.uuid4()),
        "hook": "order-select",
        "context": {"userId": "PractitionerRole/123", "patientId": pid, "encounterId": "89284",
                    "selections": [f"MedicationRequest/{draft['id']}"],
                    "draftOrders": {"resourceType": "Bundle", "type": "collection",
                                    "entry": [{"resource": draft}]}},
        "prefetch": prefetch,
    }


def test_an_order_select_service_and_a_hook_its_service_does_not_answer(work, server, ehr):
    cfg = work / "orders.toml"
    cfg.write_text('''
[[cds.services]]
id = "news2-on-order"
hook = "order-select"
description = "NEWS2 shown while an order is selected"
kind = "news2"
''')
    s = Server(work, ehr, extra=("--config", str(cfg)))
    try:
        _, discovery = s.get("/cds-services")
        assert [x["hook"] for x in discovery["services"]] == ["order-select"], discovery
        prefetch = {"patient": adult(),
                    "vitals": searchset(vitals(PID, ago(20), 8, 96, False, 150, 80, True, 37.0))}
        request = order_select(PID, prefetch)
        status, body = s.call("news2-on-order", request, ehr)
        assert status == 200, body
        total, band, _ = news2(8, 96, False, 150, 80, True, 37.0)
        assert body["cards"][0]["summary"].startswith(f"NEWS2 {total} "), body
        assert body["cards"][0]["indicator"] == "warning"  # a single red score: low-medium
    finally:
        stop(s.proc)
    # The patient-view service refuses an order-select call: 400, no card.
    status, body = server.call(SERVICE, order_select(PID, {"patient": adult()}), ehr)
    assert status == 400 and "cards" not in body, body


# --- risk-model cards (icu-mortality, served from models/bundles) ---

RISK = "nightingale-icu-mortality"


def card_numbers(detail: str) -> tuple[float, list[float]]:
    """p and the six-decimal contribution table of a risk card's detail."""
    import re

    p = float(re.search(r"\(p = ([0-9.]+);", detail).group(1))
    rows = [line for line in detail.splitlines()
            if line.startswith("| ") and not line.startswith("| Factor")]
    return p, [float(line.rstrip(" |").rsplit("| ", 1)[1]) for line in rows]


def test_a_risk_card_has_onnxruntimes_risk_and_contributions_that_sum_to_the_logit_change(
        server, ehr):
    import tomllib

    import numpy as np
    import onnxruntime as ort

    from cds_support import REPO, encounter, observation

    status, body = server.get("/cds-services")
    assert status == 200
    service = next(s for s in body["services"] if s["id"] == RISK)
    assert service["hook"] == "patient-view"
    assert set(service["prefetch"]) == {"patient", "observations", "conditions", "encounters"}

    today = datetime.now(timezone.utc).date()
    born = today.replace(year=today.year - 67) - timedelta(days=30)  # 67 whole years
    sbp_kpa, hr = 12.4, 118.0
    prefetch = {
        "patient": patient(PID, born.isoformat(), gender="male"),
        "observations": searchset([
            observation(PID, 1, ago(15), "8480-6", "Systolic blood pressure", sbp_kpa, "kPa"),
            observation(PID, 2, ago(15), "8867-4", "Heart rate", hr, "/min"),
            # Older values of the same codes: the latest decides.
            observation(PID, 3, ago(300), "8480-6", "Systolic blood pressure", 160, "mm[Hg]"),
        ]),
        "conditions": searchset([condition(PID, 1, SNOMED, "233604007", "Pneumonia")]),
        "encounters": searchset([encounter(PID, "89284", "EMER")]),
    }
    status, body = server.call(RISK, patient_view(PID, prefetch), ehr)
    assert status == 200, body
    [card] = body["cards"]
    assert "icu-mortality 1" in card["summary"], card
    assert len(card["summary"]) < 140
    detail = card["detail"].replace("\\", "")  # markdown-escaped: read it unescaped
    assert "NOT for clinical use without local validation" in detail

    # The feature vector from the FHIR values sent: age, SBP (kPa -> mmHg), HR, female,
    # infection, emergency; the risk by onnxruntime on it.
    x = np.array([[67, sbp_kpa * 7.500617, hr, 0, 1, 1]], dtype=np.float32)
    bundle = REPO / "models" / "bundles" / "icu-mortality"
    session = ort.InferenceSession(str(bundle / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    expected = float(session.run(None, {"features": x})[1][0, 1])
    p, contributions = card_numbers(detail)
    assert abs(p - expected) < 1e-5, (p, expected)
    manifest = tomllib.loads((bundle / "bundle.toml").read_text())
    threshold = manifest["thresholds"][0]["value"]
    assert card["indicator"] == ("warning" if expected >= threshold else "info")

    means = np.array([manifest["attribution"]["means"]], dtype=np.float32)
    p_ref = float(session.run(None, {"features": means})[1][0, 1])
    logit = lambda q: float(np.log(q / (1 - q)))  # noqa: E731
    assert len(contributions) == 6
    assert abs(sum(contributions) - (logit(p) - logit(p_ref))) < 1e-4, (
        sum(contributions), logit(p) - logit(p_ref))
    assert " raised the risk (+" in detail or " lowered the risk (" in detail


def test_a_risk_card_names_missing_inputs_and_gives_no_score(server, ehr):
    prefetch = {"patient": adult(), "observations": searchset([]),
                "conditions": searchset([]), "encounters": searchset([])}
    status, body = server.call(RISK, patient_view(PID, prefetch), ehr)
    assert status == 200, body
    [card] = body["cards"]
    assert card["indicator"] == "info"
    assert "not calculated" in card["summary"]
    detail = card["detail"].replace("\\", "")
    for name in ("systolic bp", "heart rate", "emergency"):
        assert name in detail, detail
    assert "(p = " not in detail
