"""Helpers of the CDS Hooks peer tests (test_cds_hooks.py): an EHR's signing keys and JWKS
(ES384 and RS384, made with `cryptography`), tokens signed with PyJWT as the CDS Hooks 2.0
specification asks (iss, sub, aud = the service URL, exp, iat, jti; kid in the header), the
server started with `--cds-trust ISSUER=JWKS_FILE`, and FHIR R4 resources built for the
requests and validated with `fhir.resources` (its R4B models: R4B changed nothing in
Patient, Observation, Condition or Bundle that these resources use)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from dicom_support import binary, free_port, stop

REPO = Path(__file__).resolve().parents[2]
ISSUER = "https://ehr.example.nhs.uk"
START_TIMEOUT_S = 60.0


class Ehr:
    """An EHR's keys: one EC P-384 (ES384) and one RSA 3072 (RS384), published in a JWKS."""

    def __init__(self, work: Path, issuer: str = ISSUER):
        self.issuer = issuer
        self.ec = ec.generate_private_key(ec.SECP384R1())
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        self.keys = {"ec-1": (self.ec, "ES384"), "rsa-1": (self.rsa, "RS384")}
        jwks = {"keys": []}
        for kid, (key, alg) in self.keys.items():
            jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
            jwk.update({"kid": kid, "alg": alg, "use": "sig"})
            jwks["keys"].append(jwk)
        self.jwks_path = work / f"jwks-{uuid.uuid4().hex[:8]}.json"
        self.jwks_path.write_text(json.dumps(jwks))

    def public_pem(self, kid: str) -> bytes:
        return self.keys[kid][0].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def token(self, aud: str, kid: str = "ec-1", **override) -> str:
        key, alg = self.keys[kid]
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": "ehr-client", "aud": aud, "iat": now,
                  "exp": now + 300, "jti": str(uuid.uuid4())}
        claims.update(override)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})


class Server:
    """`nightingale serve` on free ports with the EHR trusted."""

    def __init__(self, work: Path, ehr: Ehr, extra: tuple[str, ...] = ()):
        self.http = free_port()
        self.base = f"http://127.0.0.1:{self.http}"
        self.stderr = work / f"server-{self.http}.log"
        cmd = [str(binary()), "serve", "--http-addr", f"127.0.0.1:{self.http}",
               "--data-dir", str(work / f"data-{self.http}"),
               "--cds-trust", f"{ehr.issuer}={ehr.jwks_path}", *extra]
        env = {**os.environ, "NIGHTINGALE_LOG": "info"}
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                                         env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited:\n{self.log()}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{self.base}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        stop(self.proc)
        pytest.fail(f"server not ready:\n{self.log()}", pytrace=False)

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def url(self, service: str) -> str:
        return f"{self.base}/cds-services/{service}"

    def get(self, path: str) -> tuple[int, dict]:
        return self.request("GET", path)

    def request(self, method: str, path: str, body: dict | bytes | None = None,
                token: str | None = None, headers: dict | None = None) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.base}{path}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else {}
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, {"raw": raw.decode(errors="replace")}

    def call(self, service: str, request: dict, ehr: Ehr, **claims) -> tuple[int, dict]:
        return self.request("POST", f"/cds-services/{service}", request,
                            token=ehr.token(self.url(service), **claims))

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"{self.base}/metrics", timeout=10) as r:
            text = r.read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


# --- FHIR R4 resources (validated with fhir.resources' R4B models) ---

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"


def validate(resource: dict) -> dict:
    """The resource, after fhir.resources has parsed it (raises on an invalid one)."""
    import importlib

    kind = resource["resourceType"]
    module = importlib.import_module(f"fhir.resources.R4B.{kind.lower()}")
    getattr(module, kind).model_validate(resource)
    return resource


def patient(pid: str, birth_date: str, gender: str = "female") -> dict:
    return validate({"resourceType": "Patient", "id": pid, "active": True,
                     "gender": gender, "birthDate": birth_date})


def _obs(pid: str, n: int, when: str, code: tuple[str, str, str], **value) -> dict:
    system, c, display = code
    return validate({
        "resourceType": "Observation", "id": f"{pid}-obs-{n}", "status": "final",
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "vital-signs"}]}],
        "code": {"coding": [{"system": system, "code": c, "display": display}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when, **value})


def quantity(value: float, unit: str) -> dict:
    return {"valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit}}


def concept(system: str, code: str, display: str) -> dict:
    return {"valueCodeableConcept": {"coding": [{"system": system, "code": code,
                                                  "display": display}]}}


def vitals(pid: str, when: str, rr, spo2, on_oxygen: bool, sbp, hr, alert: bool, temp,
           temp_unit: str = "Cel") -> list[dict]:
    """One observation per NEWS2 parameter, all at `when` (an ISO 8601 date-time)."""
    out = [
        _obs(pid, 1, when, (LOINC, "9279-1", "Respiratory rate"), **quantity(rr, "/min")),
        _obs(pid, 2, when, (LOINC, "59408-5", "Oxygen saturation by pulse oximetry"),
             **quantity(spo2, "%")),
        _obs(pid, 3, when, (LOINC, "3151-8", "Inhaled oxygen flow rate"),
             **quantity(2 if on_oxygen else 0, "L/min")),
        _obs(pid, 5, when, (LOINC, "8867-4", "Heart rate"), **quantity(hr, "/min")),
        _obs(pid, 6, when, (LOINC, "67775-7", "Level of responsiveness"),
             **(concept(SNOMED, "248234008", "Mentally alert") if alert
                else concept(SNOMED, "130987000", "Acute confusion"))),
        _obs(pid, 7, when, (LOINC, "8310-5", "Body temperature"), **quantity(temp, temp_unit)),
    ]
    bp = validate({
        "resourceType": "Observation", "id": f"{pid}-obs-4", "status": "final",
        "category": [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/observation-category",
            "code": "vital-signs"}]}],
        "code": {"coding": [{"system": LOINC, "code": "85354-9",
                             "display": "Blood pressure panel"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "component": [
            {"code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
             **quantity(sbp, "mm[Hg]")},
            {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
             **quantity(70, "mm[Hg]")},
        ]})
    out.insert(3, bp)
    return out


def searchset(resources: list[dict]) -> dict:
    return validate({"resourceType": "Bundle", "type": "searchset", "total": len(resources),
                     "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": r}
                               for r in resources]})


def condition(pid: str, n: int, system: str, code: str, display: str) -> dict:
    return validate({
        "resourceType": "Condition", "id": f"{pid}-cond-{n}",
        "clinicalStatus": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
            "code": "active"}]},
        "verificationStatus": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
            "code": "confirmed"}]},
        "code": {"coding": [{"system": system, "code": code, "display": display}]},
        "subject": {"reference": f"Patient/{pid}"}})


def patient_view(pid: str, prefetch: dict | None, fhir_server: str | None = None,
                 token: str | None = None) -> dict:
    """A patient-view request shaped as the CDS Hooks 2.0 specification's example."""
    req = {
        "hookInstance": str(uuid.uuid4()),
        "hook": "patient-view",
        "context": {"userId": "Practitioner/example", "patientId": pid, "encounterId": "89284"},
    }
    if fhir_server is not None:
        req["fhirServer"] = fhir_server
        req["fhirAuthorization"] = {
            "access_token": token or "some-opaque-fhir-access-token",
            "token_type": "Bearer", "expires_in": 300,
            "scope": "user/Patient.read user/Observation.read", "subject": "cds-service4"}
    if prefetch is not None:
        req["prefetch"] = prefetch
    return req


def encounter(pid: str, eid: str, klass: str, status: str = "in-progress") -> dict:
    return validate({
        "resourceType": "Encounter", "id": eid, "status": status,
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": klass},
        "subject": {"reference": f"Patient/{pid}"}})


def observation(pid: str, n: int, when: str, code: str, display: str, value: float,
                unit: str) -> dict:
    return _obs(pid, n, when, (LOINC, code, display), **quantity(value, unit))
