"""NEWS2 as the Royal College of Physicians' 2017 chart prints it, written for the tests
independently of the Rust code (the expected values of tests/peer/test_cds_hooks.py).

Royal College of Physicians. National Early Warning Score (NEWS) 2: Standardising the
assessment of acute-illness severity in the NHS. Updated report of a working party.
London: RCP, 2017. Chart 1 (the scoring system) and Table 3 / Chart 2 (clinical response).
"""

from __future__ import annotations


def respiration(rate: int) -> int:
    if rate <= 8:
        return 3
    if rate <= 11:
        return 1
    if rate <= 20:
        return 0
    if rate <= 24:
        return 2
    return 3


def spo2_scale1(spo2: int) -> int:
    if spo2 <= 91:
        return 3
    if spo2 <= 93:
        return 2
    if spo2 <= 95:
        return 1
    return 0


def spo2_scale2(spo2: int, on_oxygen: bool) -> int:
    if spo2 <= 83:
        return 3
    if spo2 <= 85:
        return 2
    if spo2 <= 87:
        return 1
    if spo2 <= 92:
        return 0
    if not on_oxygen:
        return 0  # >= 93 on air
    if spo2 <= 94:
        return 1
    if spo2 <= 96:
        return 2
    return 3


def systolic(bp: int) -> int:
    if bp <= 90:
        return 3
    if bp <= 100:
        return 2
    if bp <= 110:
        return 1
    if bp <= 219:
        return 0
    return 3


def pulse(rate: int) -> int:
    if rate <= 40:
        return 3
    if rate <= 50:
        return 1
    if rate <= 90:
        return 0
    if rate <= 110:
        return 1
    if rate <= 130:
        return 2
    return 3


def temperature(celsius: float) -> int:
    t = round(celsius, 1)
    if t <= 35.0:
        return 3
    if t <= 36.0:
        return 1
    if t <= 38.0:
        return 0
    if t <= 39.0:
        return 1
    return 2


def news2(rr: int, spo2: int, on_oxygen: bool, sbp: int, hr: int, alert: bool,
          temp_c: float, scale2: bool = False) -> tuple[int, str, dict[str, int]]:
    """(aggregate, band, sub-scores). Bands: low (0-4), low-medium (a single red score 3),
    medium (5-6), high (>= 7)."""
    subs = {
        "respiration": respiration(rr),
        "spo2": spo2_scale2(spo2, on_oxygen) if scale2 else spo2_scale1(spo2),
        "oxygen": 2 if on_oxygen else 0,
        "systolic": systolic(sbp),
        "pulse": pulse(hr),
        "consciousness": 0 if alert else 3,
        "temperature": temperature(temp_c),
    }
    total = sum(subs.values())
    if total >= 7:
        band = "high"
    elif total >= 5:
        band = "medium"
    elif any(v == 3 for v in subs.values()):
        band = "low-medium"
    else:
        band = "low"
    return total, band, subs
