#!/usr/bin/env python3
"""A worked CDS Hooks 2.0 call, as an EHR makes one: its signing key and JWKS, a signed JWT,
a `patient-view` request with FHIR R4 prefetch, and the cards that come back.

    pip install pyjwt cryptography                 # (in the test venv already)
    python scripts/cds_example.py keys demo-ehr    # demo-ehr/ehr-key.pem + demo-ehr/ehr-jwks.json
    nightingale serve --cds-trust https://ehr.example.org=demo-ehr/ehr-jwks.json
    python scripts/cds_example.py call --key demo-ehr/ehr-key.pem [--url http://127.0.0.1:8000]
                                       [--service nightingale-news2] [--show-request]

What the service checks (README "CDS Hooks"): the token is signed by a key of the trusted
issuer's JWKS (`kid` in its header), `iss` is that issuer, `aud` is the service's URL as
called, `exp`/`iat` are current and `jti` is new. The prefetch keys are the ones discovery
(`GET /cds-services`) lists for the service; NEWS2 reads the latest vital sign of each
parameter by its LOINC code (decision-support/src/vitals.rs). The vitals below score NEWS2 12, high (respiratory rate
24, SpO2 93 % on scale 1, on oxygen, systolic 100, pulse 111 and temperature 39.1 °C: 2
points each; alert: 0). Demo data only: no real patient.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ISSUER = "https://ehr.example.org"
KID = "ehr-demo-1"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
PATIENT = "demo-patient-1"


def keys(out: Path) -> None:
    """An EC P-384 key (ES384) and the JWKS publishing its public half."""
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    (out / "ehr-key.pem").write_bytes(pem)
    (out / "ehr-key.pem").chmod(0o600)
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": KID, "alg": "ES384", "use": "sig"})
    (out / "ehr-jwks.json").write_text(json.dumps({"keys": [jwk]}, indent=2))
    print(f"wrote {out / 'ehr-key.pem'} and {out / 'ehr-jwks.json'}; start the server with\n"
          f"  nightingale serve --cds-trust {ISSUER}={out / 'ehr-jwks.json'}")


def token(key_pem: bytes, audience: str) -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "sub": "ehr-demo-client", "aud": audience, "iat": now,
              "exp": now + 300, "jti": str(uuid.uuid4())}
    key = serialization.load_pem_private_key(key_pem, password=None)
    return jwt.encode(claims, key, algorithm="ES384", headers={"kid": KID, "typ": "JWT"})


def observation(n: int, when: str, code: str, display: str, value: dict) -> dict:
    return {"resourceType": "Observation", "id": f"{PATIENT}-obs-{n}", "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "vital-signs"}]}],
            "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
            "subject": {"reference": f"Patient/{PATIENT}"}, "effectiveDateTime": when, **value}


def quantity(value: float, unit: str) -> dict:
    return {"valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit}}


def searchset(resources: list[dict]) -> dict:
    return {"resourceType": "Bundle", "type": "searchset", "total": len(resources),
            "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": r} for r in resources]}


def request(prefetch_keys: dict) -> dict:
    """A patient-view request whose prefetch answers the keys discovery lists."""
    when = (datetime.now(timezone.utc) - timedelta(minutes=15)).isoformat(timespec="seconds")
    vitals = [
        observation(1, when, "9279-1", "Respiratory rate", quantity(24, "/min")),
        observation(2, when, "59408-5", "Oxygen saturation by pulse oximetry", quantity(93, "%")),
        observation(3, when, "3151-8", "Inhaled oxygen flow rate", quantity(2, "L/min")),
        {**observation(4, when, "85354-9", "Blood pressure panel", {}),
         "component": [{"code": {"coding": [{"system": LOINC, "code": "8480-6"}]},
                        **quantity(100, "mm[Hg]")},
                       {"code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
                        **quantity(65, "mm[Hg]")}]},
        observation(5, when, "8867-4", "Heart rate", quantity(111, "/min")),
        observation(6, when, "67775-7", "Level of responsiveness",
                    {"valueCodeableConcept": {"coding": [{"system": SNOMED, "code": "248234008",
                                                          "display": "Mentally alert"}]}}),
        observation(7, when, "8310-5", "Body temperature", quantity(39.1, "Cel")),
    ]
    patient = {"resourceType": "Patient", "id": PATIENT, "gender": "female",
               "birthDate": "1950-03-14"}
    prefetch = {}
    for key, template in prefetch_keys.items():
        if template.startswith("Patient/"):
            prefetch[key] = patient
        elif template.startswith("Observation?"):
            # The service reads each parameter by its code: every key that searches
            # Observations gets the vital signs (a real EHR runs each key's own search).
            prefetch[key] = searchset(vitals)
        else:
            prefetch[key] = searchset([])  # no Conditions, Encounters, ... on record
    return {"hookInstance": str(uuid.uuid4()), "hook": "patient-view",
            "context": {"userId": "Practitioner/demo", "patientId": PATIENT},
            "prefetch": prefetch}


def http(method: str, url: str, body: dict | None = None,
         bearer: str | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if bearer is not None:
        req.add_header("Authorization", f"Bearer {bearer}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"raw": raw.decode(errors="replace")}


def call(url: str, key: Path, service: str, show_request: bool) -> int:
    status, discovery = http("GET", f"{url}/cds-services")
    if status != 200:
        print(f"discovery answered {status}: {discovery}", file=sys.stderr)
        return 1
    offered = {s["id"]: s for s in discovery.get("services", [])}
    if service not in offered:
        print(f"no service {service!r}; offered: {sorted(offered)}", file=sys.stderr)
        return 1
    body = request(offered[service].get("prefetch", {}))
    if show_request:
        print(json.dumps(body, indent=2))
    # `aud` is the service's URL exactly as it is called.
    service_url = f"{url}/cds-services/{service}"
    status, answer = http("POST", service_url, body, bearer=token(key.read_bytes(), service_url))
    print(json.dumps(answer, indent=2))
    if status != 200:
        print(f"the service answered {status}", file=sys.stderr)
        return 1
    for card in answer.get("cards", []):
        print(f"[{card['indicator']}] {card['summary']}", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keys", help="write an EHR's demo signing key and JWKS")
    k.add_argument("out", type=Path)
    c = sub.add_parser("call", help="call a CDS service as the EHR")
    c.add_argument("--url", default="http://127.0.0.1:8000")
    c.add_argument("--key", type=Path, required=True)
    c.add_argument("--service", default="nightingale-news2")
    c.add_argument("--show-request", action="store_true")
    args = parser.parse_args()
    if args.command == "keys":
        keys(args.out)
        return 0
    return call(args.url.rstrip("/"), args.key, args.service, args.show_request)


if __name__ == "__main__":
    sys.exit(main())
