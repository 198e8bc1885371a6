"""Fixture for the SNOMED CT identifier check (models/tests/concept_codes.rs).

Writes models/tests/fixtures/codes/sctids.txt: every 8th SNOMED CT concept identifier of
pydicom's code dictionary (pydicom.sr.codedict, from DICOM PS3.16), sorted, one per line, so
that the check is held to identifiers a peer lists, not to ones made by the code under test.
The dictionary holds one value that is not a valid identifier (its Verhoeff check digit is
wrong: a transcription error in the source); it is written to `not-sctids.txt` with the
reason, and the test expects it refused.

    .venv/bin/python models/train/make_code_fixtures.py
"""

from pathlib import Path

from pydicom.sr.codedict import codes

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "codes"

# Known to be wrong in the dictionary (checked by hand against the algorithm of the SNOMED CT
# Technical Implementation Guide): not a concept identifier.
KNOWN_BAD = {"115347700": "check digit wrong in pydicom's codedict (SerumAlbuminBelowReferenceRange)"}


def main() -> None:
    values = set()
    for name in dir(codes.SCT):
        try:
            values.add(getattr(codes.SCT, name).value)
        except AttributeError:
            continue
    good = sorted(v for v in values if v not in KNOWN_BAD)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "sctids.txt").write_text("".join(f"{v}\n" for v in good[::8]))
    (OUT / "not-sctids.txt").write_text(
        "".join(f"{v} {why}\n" for v, why in sorted(KNOWN_BAD.items())))
    print(f"{len(good[::8])} of {len(good)} identifiers written to {OUT}")


if __name__ == "__main__":
    main()
