#!/usr/bin/env python3
"""Validates the FHIR fixtures of the decision-support tests with the `fhir.resources`
package (PyPI), whose models are generated from the FHIR specification.

fhir.resources 8 defaults to R5; its `R4B` subpackage is used here. R4B differs from R4 in
medication-definition and evidence resources only: Patient, Observation, Condition and
Bundle are the same, so a fixture valid in R4B is valid R4.

    python3 -m venv /tmp/fhir-venv && /tmp/fhir-venv/bin/pip install 'fhir.resources==8.3.0'
    /tmp/fhir-venv/bin/python decision-support/tests/validate_fixtures.py
"""

import json
import pathlib
import sys

from fhir.resources.R4B import get_fhir_model_class

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


def main() -> int:
    failures = 0
    for path in sorted(FIXTURES.glob("*.json")):
        data = json.loads(path.read_text())
        if "resourceType" not in data:
            continue  # not a FHIR resource (e.g. a JWKS)
        try:
            get_fhir_model_class(data["resourceType"]).model_validate(data)
            print(f"valid R4B {data['resourceType']}: {path.name}")
        except Exception as e:  # noqa: BLE001 - report every failure
            failures += 1
            print(f"INVALID {path.name}: {e}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
