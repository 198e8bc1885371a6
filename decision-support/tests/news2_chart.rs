//! NEWS2 at every band edge of every parameter, both sides of each edge.
//!
//! Every expected value below is written from the published chart, not computed by the
//! code under test: Royal College of Physicians, *National Early Warning Score (NEWS) 2:
//! Standardising the assessment of acute-illness severity in the NHS*, updated report of a
//! working party, London: RCP, 2017 — Chart 1 (the NEWS2 scoring system), Chart 3 (NEWS
//! thresholds and triggers) and Chart 4 (clinical response to the NEWS trigger thresholds).
//!
//! Chart 1, as printed (score 3 | 2 | 1 | 0 | 1 | 2 | 3):
//! - Respiration rate (per minute): ≤8 | | 9–11 | 12–20 | | 21–24 | ≥25
//! - SpO2 Scale 1 (%): ≤91 | 92–93 | 94–95 | ≥96
//! - SpO2 Scale 2 (%): ≤83 | 84–85 | 86–87 | 88–92, ≥93 on air | 93–94 on oxygen |
//!   95–96 on oxygen | ≥97 on oxygen
//! - Air or oxygen?: Air 0, Oxygen 2
//! - Systolic blood pressure (mmHg): ≤90 | 91–100 | 101–110 | 111–219 | | | ≥220
//! - Pulse (per minute): ≤40 | | 41–50 | 51–90 | 91–110 | 111–130 | ≥131
//! - Consciousness: Alert 0; CVPU 3
//! - Temperature (°C): ≤35.0 | | 35.1–36.0 | 36.1–38.0 | 38.1–39.0 | ≥39.1 (2)
//!
//! Values between the printed integers (or tenths, for temperature) are charted rounded to
//! the nearest, halves up (the crate's documented rule); those cases say so.

use nightingale_decision_support::news2::{
    self, ClinicalRisk, News2Inputs, SpO2Scale, air_or_oxygen_score, consciousness_score,
    pulse_score, respiration_rate_score, spo2_score, systolic_score, temperature_score,
};
use nightingale_decision_support::vitals::{Acvpu, OxygenSupply, Parameter};

use OxygenSupply::{Air, Oxygen};
use SpO2Scale::{Scale1, Scale2};

#[test]
fn respiration_rate() {
    for (rate, want) in [
        (0.0, 3),
        (8.0, 3),
        (9.0, 1),
        (11.0, 1),
        (12.0, 0),
        (20.0, 0),
        (21.0, 2),
        (24.0, 2),
        (25.0, 3),
        (60.0, 3),
        // Charted to the nearest whole breath.
        (8.4, 3),
        (8.5, 1),
        (11.49, 1),
        (11.5, 0),
        (20.4, 0),
        (20.5, 2),
        (24.4, 2),
        (24.5, 3),
    ] {
        assert_eq!(respiration_rate_score(rate), want, "RR {rate}");
    }
}

#[test]
fn spo2_scale_1() {
    for supply in [Air, Oxygen] {
        for (spo2, want) in [
            (70.0, 3),
            (91.0, 3),
            (92.0, 2),
            (93.0, 2),
            (94.0, 1),
            (95.0, 1),
            (96.0, 0),
            (100.0, 0),
            // Charted to the nearest whole percent.
            (91.4, 3),
            (91.5, 2),
            (93.4, 2),
            (93.5, 1),
            (95.4, 1),
            (95.5, 0),
        ] {
            assert_eq!(
                spo2_score(spo2, Scale1, supply),
                want,
                "SpO2 {spo2} scale 1 {supply:?}"
            );
        }
    }
}

#[test]
fn spo2_scale_2_on_air() {
    for (spo2, want) in [
        (70.0, 3),
        (83.0, 3),
        (84.0, 2),
        (85.0, 2),
        (86.0, 1),
        (87.0, 1),
        (88.0, 0),
        (92.0, 0),
        // ≥93 on air scores 0.
        (93.0, 0),
        (94.0, 0),
        (96.0, 0),
        (97.0, 0),
        (100.0, 0),
        (83.4, 3),
        (83.5, 2),
        (87.5, 0),
    ] {
        assert_eq!(
            spo2_score(spo2, Scale2, Air),
            want,
            "SpO2 {spo2} scale 2 air"
        );
    }
}

#[test]
fn spo2_scale_2_on_oxygen() {
    for (spo2, want) in [
        (70.0, 3),
        (83.0, 3),
        (84.0, 2),
        (85.0, 2),
        (86.0, 1),
        (87.0, 1),
        (88.0, 0),
        (92.0, 0),
        (93.0, 1),
        (94.0, 1),
        (95.0, 2),
        (96.0, 2),
        (97.0, 3),
        (100.0, 3),
        (92.4, 0),
        (92.5, 1),
        (94.5, 2),
        (96.5, 3),
    ] {
        assert_eq!(
            spo2_score(spo2, Scale2, Oxygen),
            want,
            "SpO2 {spo2} scale 2 oxygen"
        );
    }
}

#[test]
fn air_or_oxygen() {
    assert_eq!(air_or_oxygen_score(Air), 0);
    assert_eq!(air_or_oxygen_score(Oxygen), 2);
}

#[test]
fn systolic_blood_pressure() {
    for (sbp, want) in [
        (50.0, 3),
        (90.0, 3),
        (91.0, 2),
        (100.0, 2),
        (101.0, 1),
        (110.0, 1),
        (111.0, 0),
        (219.0, 0),
        (220.0, 3),
        (260.0, 3),
        (90.4, 3),
        (90.5, 2),
        (110.5, 0),
        (219.4, 0),
        (219.5, 3),
    ] {
        assert_eq!(systolic_score(sbp), want, "SBP {sbp}");
    }
}

#[test]
fn pulse() {
    for (hr, want) in [
        (20.0, 3),
        (40.0, 3),
        (41.0, 1),
        (50.0, 1),
        (51.0, 0),
        (90.0, 0),
        (91.0, 1),
        (110.0, 1),
        (111.0, 2),
        (130.0, 2),
        (131.0, 3),
        (180.0, 3),
        (40.5, 1),
        (50.5, 0),
        (90.5, 1),
        (110.5, 2),
        (130.4, 2),
        (130.5, 3),
    ] {
        assert_eq!(pulse_score(hr), want, "pulse {hr}");
    }
}

#[test]
fn consciousness() {
    assert_eq!(consciousness_score(Acvpu::Alert), 0);
    assert_eq!(consciousness_score(Acvpu::NewConfusion), 3);
    assert_eq!(consciousness_score(Acvpu::Voice), 3);
    assert_eq!(consciousness_score(Acvpu::Pain), 3);
    assert_eq!(consciousness_score(Acvpu::Unresponsive), 3);
}

#[test]
fn temperature() {
    for (t, want) in [
        (33.0, 3),
        (35.0, 3),
        (35.1, 1),
        (36.0, 1),
        (36.1, 0),
        (38.0, 0),
        (38.1, 1),
        (39.0, 1),
        (39.1, 2),
        (41.0, 2),
        // Charted to one decimal place, halves up.
        (35.04, 3),
        (35.05, 1),
        (36.04, 1),
        (36.05, 0),
        (38.04, 0),
        (38.05, 1),
        (39.04, 1),
        (39.05, 2),
    ] {
        assert_eq!(temperature_score(t), want, "temperature {t}");
    }
    // 95.09 °F = 35.05 °C: charted 35.1, scores 1.
    assert_eq!(temperature_score((95.09 - 32.0) * 5.0 / 9.0), 1);
}

fn normal() -> News2Inputs {
    // Every parameter scores 0 on Chart 1.
    News2Inputs {
        respiration_rate: 16.0,
        spo2: 97.0,
        air_or_oxygen: Air,
        systolic_blood_pressure: 120.0,
        pulse: 70.0,
        consciousness: Acvpu::Alert,
        temperature: 37.0,
    }
}

#[test]
fn aggregate_and_clinical_risk_bands() {
    // Chart 3: 0–4 low; a single 3 low–medium; 5–6 medium; ≥7 high.
    let s = news2::score(&normal(), Scale1);
    assert_eq!((s.total, s.risk), (0, ClinicalRisk::Low));
    assert_eq!(s.response().monitoring, "Minimum 12 hourly");

    // 4 = RR 21 (2) + pulse 111 (2): low, no red score.
    let s = news2::score(
        &News2Inputs {
            respiration_rate: 21.0,
            pulse: 111.0,
            ..normal()
        },
        Scale1,
    );
    assert_eq!((s.total, s.risk), (4, ClinicalRisk::Low));
    assert_eq!(s.response().monitoring, "Minimum 4–6 hourly");

    // 3 = new confusion alone: a red score, low–medium.
    let s = news2::score(
        &News2Inputs {
            consciousness: Acvpu::NewConfusion,
            ..normal()
        },
        Scale1,
    );
    assert_eq!((s.total, s.risk), (3, ClinicalRisk::LowMedium));
    assert_eq!(s.sub_score(Parameter::Consciousness), 3);
    assert_eq!(s.response().monitoring, "Minimum 1 hourly");
    assert_eq!(s.risk.response(), "Urgent ward-based response");

    // 4 = SpO2 91 (3) + temperature 38.1 (1): red score, low–medium.
    let s = news2::score(
        &News2Inputs {
            spo2: 91.0,
            temperature: 38.1,
            ..normal()
        },
        Scale1,
    );
    assert_eq!((s.total, s.risk), (4, ClinicalRisk::LowMedium));

    // 5 = oxygen (2) + SBP 90 (3): medium (the aggregate rules over the red score).
    let s = news2::score(
        &News2Inputs {
            air_or_oxygen: Oxygen,
            systolic_blood_pressure: 90.0,
            ..normal()
        },
        Scale1,
    );
    assert_eq!((s.total, s.risk), (5, ClinicalRisk::Medium));
    assert_eq!(s.risk.response(), "Key threshold for urgent response");

    // 6 = RR 25 (3) + pulse 91 (1) + SpO2 94 (1) + temperature 39.0 (1): medium.
    let s = news2::score(
        &News2Inputs {
            respiration_rate: 25.0,
            pulse: 91.0,
            spo2: 94.0,
            temperature: 39.0,
            ..normal()
        },
        Scale1,
    );
    assert_eq!((s.total, s.risk), (6, ClinicalRisk::Medium));

    // 7 = oxygen (2) + SpO2 92 (2) + RR 21 (2) + temperature 39.0 (1): high.
    let s = news2::score(
        &News2Inputs {
            air_or_oxygen: Oxygen,
            spo2: 92.0,
            respiration_rate: 21.0,
            temperature: 39.0,
            ..normal()
        },
        Scale1,
    );
    assert_eq!((s.total, s.risk), (7, ClinicalRisk::High));
    assert_eq!(s.risk.response(), "Urgent or emergency response");
    assert_eq!(
        s.response().monitoring,
        "Continuous monitoring of vital signs"
    );

    // The worst case on every parameter: 3+3+2+3+3+3+2 = 19 on scale 1 (20 on scale 2 on
    // oxygen, where SpO2 ≥97 scores 3 — but here SpO2 is 80, scoring 3 on both).
    let worst = News2Inputs {
        respiration_rate: 30.0,
        spo2: 80.0,
        air_or_oxygen: Oxygen,
        systolic_blood_pressure: 80.0,
        pulse: 140.0,
        consciousness: Acvpu::Unresponsive,
        temperature: 40.0,
    };
    assert_eq!(news2::score(&worst, Scale1).total, 19);
    assert_eq!(news2::score(&worst, Scale2).total, 19);
}

#[test]
fn scale_2_with_and_without_oxygen() {
    // SpO2 95 on oxygen: scale 1 → 1, scale 2 → 2; plus 2 for oxygen.
    let on_o2 = News2Inputs {
        spo2: 95.0,
        air_or_oxygen: Oxygen,
        ..normal()
    };
    assert_eq!(news2::score(&on_o2, Scale1).total, 1 + 2);
    assert_eq!(news2::score(&on_o2, Scale2).total, 2 + 2);
    // SpO2 90 on air: scale 1 → 3 (low–medium), scale 2 → 0 (within the 88–92 target).
    let on_air = News2Inputs {
        spo2: 90.0,
        ..normal()
    };
    let s1 = news2::score(&on_air, Scale1);
    assert_eq!((s1.total, s1.risk), (3, ClinicalRisk::LowMedium));
    let s2 = news2::score(&on_air, Scale2);
    assert_eq!((s2.total, s2.risk), (0, ClinicalRisk::Low));
    assert_eq!(s2.scale, Scale2);
    // SpO2 98 on oxygen, scale 2: 3 + 2 = 5, medium.
    let s = news2::score(
        &News2Inputs {
            spo2: 98.0,
            air_or_oxygen: Oxygen,
            ..normal()
        },
        Scale2,
    );
    assert_eq!((s.total, s.risk), (5, ClinicalRisk::Medium));
}
