"""Inputs of benches/cds/load.sh: an EHR key and its JWKS, one ES384 token per request (the
server refuses a replayed jti, so a load test cannot reuse one), the patient-view request
body (the CDS Hooks 2.0 example's envelope, NEWS2 prefetch of 7 vital signs), and a KServe
v2 body for the same bundle's infer, side by side.

    python benches/cds/make_load.py OUT_DIR PORT TOKENS [ES384|RS384]
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ISSUER = "https://ehr.bench.example"
SERVICE = "nightingale-news2"


def main() -> None:
    out, port, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    alg = sys.argv[4] if len(sys.argv) > 4 else "ES384"
    out.mkdir(parents=True, exist_ok=True)
    if alg == "ES384":
        key = ec.generate_private_key(ec.SECP384R1())
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(key.public_key()))
    jwk.update({"kid": "bench-1", "alg": alg, "use": "sig"})
    (out / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    aud = f"http://127.0.0.1:{port}/cds-services/{SERVICE}"
    now = int(time.time())
    with open(out / "tokens.txt", "w") as f:
        for _ in range(count):
            claims = {"iss": ISSUER, "sub": "bench", "aud": aud, "iat": now, "exp": now + 1800,
                      "jti": str(uuid.uuid4())}
            f.write(jwt.encode(claims, key, algorithm=alg, headers={"kid": "bench-1"}) + "\n")
    when = (datetime.now(timezone.utc) - timedelta(minutes=10)).isoformat(timespec="seconds")

    def obs(n, code, value):
        return {"resourceType": "Observation", "id": f"o{n}", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
                "subject": {"reference": "Patient/1288992"}, "effectiveDateTime": when, **value}

    def q(v, unit):
        return {"valueQuantity": {"value": v, "unit": unit, "system": "http://unitsofmeasure.org",
                                  "code": unit}}

    vitals = [obs(1, "9279-1", q(22, "/min")), obs(2, "59408-5", q(94, "%")),
              obs(3, "3151-8", q(0, "L/min")), obs(4, "8480-6", q(105, "mm[Hg]")),
              obs(5, "8867-4", q(115, "/min")),
              obs(6, "67775-7", {"valueCodeableConcept": {"coding": [
                  {"system": "http://snomed.info/sct", "code": "248234008"}]}}),
              obs(7, "8310-5", q(38.5, "Cel"))]
    request = {
        "hookInstance": str(uuid.uuid4()), "hook": "patient-view",
        "context": {"userId": "Practitioner/example", "patientId": "1288992", "encounterId": "89284"},
        "prefetch": {
            "patient": {"resourceType": "Patient", "id": "1288992", "gender": "male",
                        "birthDate": "1955-12-23"},
            "vitals": {"resourceType": "Bundle", "type": "searchset",
                       "entry": [{"resource": r} for r in vitals]},
        },
    }
    (out / "hook.json").write_text(json.dumps(request))
    # The same kind of patient through KServe infer of icu-mortality (age, SBP, HR, female,
    # infection, emergency): one row, JSON.
    infer = {"inputs": [{"name": "features", "shape": [1, 6], "datatype": "FP32",
                         "data": [70, 105, 115, 0, 1, 1]}]}
    (out / "infer.json").write_text(json.dumps(infer))


if __name__ == "__main__":
    main()
