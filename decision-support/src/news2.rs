//! NEWS2, the National Early Warning Score 2 of the Royal College of Physicians (2017).
//!
//! [`score`] is the chart itself (Chart 1, the scoring system; Chart 3, thresholds and
//! triggers; Chart 4, the clinical response); [`assess`] applies it to a patient's FHIR
//! data: it gives a score only when every parameter has a usable value, and never for a
//! patient NEWS2 is not validated for (under 16, or pregnant).
//!
//! # Values between the chart's bands
//! The chart is used with values as they are charted: respiration rate, SpO2, systolic
//! pressure and pulse as whole numbers, temperature to one decimal place. A value with more
//! precision (a device average of 11.5 breaths/min, an SpO2 of 93.5 %, 35.05 °C) is first
//! rounded as it would be charted, to the nearest, halves away from zero (11.5 → 12,
//! 93.5 → 94, 35.05 → 35.1), then scored. The rounding allows 1e-9 for binary floating
//! point (35.05 is stored as 35.04999…; so is a value converted from °F).
//!
//! # SpO2 scale 2
//! Scale 2 is for patients with hypercapnic respiratory failure who have a prescribed
//! target of 88–92 %; it is used only when the patient has an active Condition coded as
//! one of [`News2Settings::scale2_conditions`] (empty by default: a trust lists the codes
//! it records such a prescription with; a diagnosis alone is not a prescribed target).

use std::fmt;

use chrono::{DateTime, Duration, Utc};

use crate::fhir::{
    CodeableConcept, LOINC, Observation, Patient, Resources, SNOMED, SystemCode, TimeBounds,
};
use crate::vitals::{
    self, Acvpu, OxygenSupply, Parameter, Unusable, UnusableReason, Vitals, VitalsOptions,
};

/// LOINC codes of a pregnancy-status Observation: 82810-3 (US Core, IPS) and 11449-6, the
/// older code still widely sent for the same answer list (only 82810-3 was read: a pregnant
/// patient coded 11449-6 was scored, a red-team finding).
pub const PREGNANCY_STATUS: [&str; 2] = ["82810-3", "11449-6"];

/// The SpO2 scale in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpO2Scale {
    /// Scale 1: every patient not on scale 2.
    Scale1,
    /// Scale 2: hypercapnic respiratory failure with a prescribed 88–92 % target.
    Scale2,
}

/// One set of observations, in the chart's units (breaths/min, %, mmHg, beats/min, °C).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct News2Inputs {
    pub respiration_rate: f64,
    pub spo2: f64,
    pub air_or_oxygen: OxygenSupply,
    pub systolic_blood_pressure: f64,
    pub pulse: f64,
    pub consciousness: Acvpu,
    pub temperature: f64,
}

/// The clinical risk band of a score (Chart 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClinicalRisk {
    /// Aggregate 0–4, no single parameter scoring 3.
    Low,
    /// A single parameter scoring 3 (aggregate 0–4): "red score".
    LowMedium,
    /// Aggregate 5–6.
    Medium,
    /// Aggregate 7 or more.
    High,
}

impl ClinicalRisk {
    /// The chart's name of the band.
    pub fn name(self) -> &'static str {
        match self {
            ClinicalRisk::Low => "low",
            ClinicalRisk::LowMedium => "low–medium",
            ClinicalRisk::Medium => "medium",
            ClinicalRisk::High => "high",
        }
    }

    /// The chart's response for the band (Chart 3).
    pub fn response(self) -> &'static str {
        match self {
            ClinicalRisk::Low => "Ward-based response",
            ClinicalRisk::LowMedium => "Urgent ward-based response",
            ClinicalRisk::Medium => "Key threshold for urgent response",
            ClinicalRisk::High => "Urgent or emergency response",
        }
    }
}

impl fmt::Display for ClinicalRisk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What Chart 4 recommends for a score.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    /// The row of Chart 4 ("0", "Total 1–4", "3 in single parameter", …).
    pub trigger: &'static str,
    /// Frequency of monitoring.
    pub monitoring: &'static str,
    /// The clinical response, one action per item.
    pub actions: &'static [&'static str],
}

/// A NEWS2 score.
#[derive(Clone, Debug, PartialEq)]
pub struct Score {
    /// The aggregate score (0–20).
    pub total: u8,
    /// Each parameter's score, in chart order.
    pub sub_scores: [(Parameter, u8); 7],
    pub scale: SpO2Scale,
    pub risk: ClinicalRisk,
}

impl Score {
    /// The sub-score of `parameter`.
    pub fn sub_score(&self, parameter: Parameter) -> u8 {
        self.sub_scores
            .iter()
            .find(|(p, _)| *p == parameter)
            .map_or(0, |(_, s)| *s)
    }

    /// Whether a single parameter scores 3 (a "red score").
    pub fn has_red_score(&self) -> bool {
        self.sub_scores.iter().any(|(_, s)| *s == 3)
    }

    /// Chart 4's recommendation for this score.
    pub fn response(&self) -> Response {
        const ZERO: &[&str] = &["Continue routine NEWS monitoring"];
        const LOW: &[&str] = &[
            "Inform registered nurse, who must assess the patient",
            "Registered nurse decides whether increased frequency of clinical monitoring or escalation of care is required",
        ];
        const RED: &[&str] = &[
            "Registered nurse to inform medical team caring for the patient, who will review and decide whether escalation of care is necessary",
        ];
        const URGENT: &[&str] = &[
            "Registered nurse to immediately inform the medical team caring for the patient",
            "Registered nurse to request urgent assessment by a clinician or team with core competencies in the care of acutely ill patients",
            "Provide clinical care in an environment with monitoring facilities",
        ];
        const EMERGENCY: &[&str] = &[
            "Registered nurse to immediately inform the medical team caring for the patient – this should be at least at specialist registrar level",
            "Emergency assessment by a team with critical care competencies, including practitioner(s) with advanced airway management skills",
            "Consider transfer of care to a level 2 or 3 clinical care facility, ie higher-dependency unit or ICU",
            "Clinical care in an environment with monitoring facilities",
        ];
        match self.risk {
            ClinicalRisk::High => Response {
                trigger: "Total 7 or more (emergency response threshold)",
                monitoring: "Continuous monitoring of vital signs",
                actions: EMERGENCY,
            },
            ClinicalRisk::Medium => Response {
                trigger: "Total 5 or more (urgent response threshold)",
                monitoring: "Minimum 1 hourly",
                actions: URGENT,
            },
            ClinicalRisk::LowMedium => Response {
                trigger: "3 in single parameter",
                monitoring: "Minimum 1 hourly",
                actions: RED,
            },
            ClinicalRisk::Low if self.total == 0 => Response {
                trigger: "0",
                monitoring: "Minimum 12 hourly",
                actions: ZERO,
            },
            ClinicalRisk::Low => Response {
                trigger: "Total 1–4",
                monitoring: "Minimum 4–6 hourly",
                actions: LOW,
            },
        }
    }
}

/// Rounds a non-negative value to `decimals` places, halves up, allowing 1e-9 of binary
/// floating-point error; returns it scaled (× 10^decimals) as an integer.
fn charted(value: f64, decimals: i32) -> i64 {
    let scaled = value * 10f64.powi(decimals);
    (scaled + 0.5 + 1e-9).floor() as i64
}

/// Chart 1: respiration rate (breaths/min).
pub fn respiration_rate_score(rate: f64) -> u8 {
    match charted(rate, 0) {
        ..=8 => 3,
        9..=11 => 1,
        12..=20 => 0,
        21..=24 => 2,
        _ => 3,
    }
}

/// Chart 1: SpO2 (%), on the given scale; `supply` matters on scale 2 only.
pub fn spo2_score(spo2: f64, scale: SpO2Scale, supply: OxygenSupply) -> u8 {
    let s = charted(spo2, 0);
    match scale {
        SpO2Scale::Scale1 => match s {
            ..=91 => 3,
            92..=93 => 2,
            94..=95 => 1,
            _ => 0,
        },
        SpO2Scale::Scale2 => match (s, supply) {
            (..=83, _) => 3,
            (84..=85, _) => 2,
            (86..=87, _) => 1,
            (88..=92, _) => 0,
            (_, OxygenSupply::Air) => 0,
            (93..=94, OxygenSupply::Oxygen) => 1,
            (95..=96, OxygenSupply::Oxygen) => 2,
            (_, OxygenSupply::Oxygen) => 3,
        },
    }
}

/// Chart 1: air (0) or supplemental oxygen (2).
pub fn air_or_oxygen_score(supply: OxygenSupply) -> u8 {
    match supply {
        OxygenSupply::Air => 0,
        OxygenSupply::Oxygen => 2,
    }
}

/// Chart 1: systolic blood pressure (mmHg).
pub fn systolic_score(mmhg: f64) -> u8 {
    match charted(mmhg, 0) {
        ..=90 => 3,
        91..=100 => 2,
        101..=110 => 1,
        111..=219 => 0,
        _ => 3,
    }
}

/// Chart 1: pulse (beats/min).
pub fn pulse_score(rate: f64) -> u8 {
    match charted(rate, 0) {
        ..=40 => 3,
        41..=50 => 1,
        51..=90 => 0,
        91..=110 => 1,
        111..=130 => 2,
        _ => 3,
    }
}

/// Chart 1: consciousness (Alert 0; new Confusion, Voice, Pain, Unresponsive 3).
pub fn consciousness_score(level: Acvpu) -> u8 {
    match level {
        Acvpu::Alert => 0,
        Acvpu::NewConfusion | Acvpu::Voice | Acvpu::Pain | Acvpu::Unresponsive => 3,
    }
}

/// Chart 1: temperature (°C), charted to one decimal place.
pub fn temperature_score(celsius: f64) -> u8 {
    match charted(celsius, 1) {
        ..=350 => 3,
        351..=360 => 1,
        361..=380 => 0,
        381..=390 => 1,
        _ => 2,
    }
}

/// The chart's score of one set of observations.
pub fn score(inputs: &News2Inputs, scale: SpO2Scale) -> Score {
    let sub_scores = [
        (
            Parameter::RespirationRate,
            respiration_rate_score(inputs.respiration_rate),
        ),
        (
            Parameter::OxygenSaturation,
            spo2_score(inputs.spo2, scale, inputs.air_or_oxygen),
        ),
        (
            Parameter::AirOrOxygen,
            air_or_oxygen_score(inputs.air_or_oxygen),
        ),
        (
            Parameter::SystolicBloodPressure,
            systolic_score(inputs.systolic_blood_pressure),
        ),
        (Parameter::PulseRate, pulse_score(inputs.pulse)),
        (
            Parameter::Consciousness,
            consciousness_score(inputs.consciousness),
        ),
        (
            Parameter::Temperature,
            temperature_score(inputs.temperature),
        ),
    ];
    let total: u8 = sub_scores.iter().map(|(_, s)| s).sum();
    let red = sub_scores.iter().any(|(_, s)| *s == 3);
    let risk = match total {
        7.. => ClinicalRisk::High,
        5..=6 => ClinicalRisk::Medium,
        _ if red => ClinicalRisk::LowMedium,
        _ => ClinicalRisk::Low,
    };
    Score {
        total,
        sub_scores,
        scale,
        risk,
    }
}

/// Settings of [`assess`].
#[derive(Clone, Debug, PartialEq)]
pub struct News2Settings {
    /// Which observations count (look-back window, clock skew).
    pub vitals: VitalsOptions,
    /// Active Conditions that put the patient on SpO2 scale 2 (none by default).
    pub scale2_conditions: Vec<SystemCode>,
    /// Active Conditions that mean the patient is pregnant (default: SNOMED 77386006
    /// *Pregnancy*, 72892002 *Normal pregnancy*).
    pub pregnancy_conditions: Vec<SystemCode>,
    /// How far back a pregnancy-status Observation ([`PREGNANCY_STATUS`]) is read (default 280
    /// days).
    pub pregnancy_look_back: Duration,
}

impl Default for News2Settings {
    fn default() -> Self {
        News2Settings {
            vitals: VitalsOptions::default(),
            scale2_conditions: vec![],
            pregnancy_conditions: default_pregnancy_conditions(),
            pregnancy_look_back: Duration::days(280),
        }
    }
}

/// SNOMED 77386006 *Pregnancy*, 72892002 *Normal pregnancy*.
pub fn default_pregnancy_conditions() -> Vec<SystemCode> {
    vec![
        SystemCode::new(SNOMED, "77386006"),
        SystemCode::new(SNOMED, "72892002"),
    ]
}

/// The minimum age NEWS2 is validated for.
pub const MINIMUM_AGE: i32 = 16;

/// Why NEWS2 does not apply to a patient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotApplicable {
    /// Under 16 (the greatest age the birth date allows).
    UnderSixteen { age: i32 },
    /// Pregnant: an active pregnancy Condition, or the latest pregnancy-status Observation.
    Pregnancy,
    /// The Patient resource says the patient has died.
    Deceased,
}

impl fmt::Display for NotApplicable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotApplicable::UnderSixteen { .. } => {
                f.write_str("NEWS2 is not validated for patients under 16 years of age")
            }
            NotApplicable::Pregnancy => f.write_str("NEWS2 is not validated in pregnancy"),
            NotApplicable::Deceased => f.write_str("the patient is recorded as deceased"),
        }
    }
}

/// Why the patient's age is not known well enough.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgeProblem {
    /// No Patient resource (or none with the expected id, or several with it that differ).
    NoPatient,
    /// The Patient has no `birthDate`.
    NoBirthDate,
    /// `birthDate` is malformed.
    MalformedBirthDate,
    /// Only a year or month is given, and the patient may be 15 or 16.
    Imprecise,
}

impl fmt::Display for AgeProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AgeProblem::NoPatient => {
                "the Patient resource was not available (or several differing ones were sent)"
            }
            AgeProblem::NoBirthDate => "the patient's date of birth is not recorded",
            AgeProblem::MalformedBirthDate => "the patient's date of birth is malformed",
            AgeProblem::Imprecise => {
                "the patient's date of birth is too imprecise to tell whether they are 16"
            }
        })
    }
}

/// What is missing for a score.
#[derive(Clone, Debug, PartialEq)]
pub struct Incomplete {
    /// Parameters with no value in the look-back window.
    pub missing: Vec<Parameter>,
    /// Parameters whose latest value cannot be used, with the reason.
    pub unusable: Vec<Unusable>,
    /// When the age could not be established.
    pub age: Option<AgeProblem>,
    /// Parameters whose latest value was dated in the future (not used). Each is also in
    /// `unusable`, with [`crate::vitals::UnusableReason::FutureTime`]; a parameter here is
    /// never scored from an older value.
    pub future_dated: Vec<Parameter>,
    /// Parameters with a newer reading that is not final yet
    /// ([`crate::vitals::Vitals::newer_not_final`]).
    pub newer_not_final: Vec<(Parameter, Option<chrono::DateTime<chrono::Utc>>)>,
}

/// A score with the values it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    pub score: Score,
    pub inputs: News2Inputs,
    /// The readings (their times and source observations).
    pub vitals: Vitals,
    /// Whether every Condition was read: when not, the pregnancy and SpO2 scale 2 checks
    /// could not see every Condition, and the card says so.
    pub conditions: ConditionsRead,
    /// Whether a search for the pregnancy status (LOINC 82810-3) was asked and could not be
    /// read: the card says pregnancy was checked against the Conditions only (it was
    /// scored without a word: a red-team finding).
    pub pregnancy_status_unread: bool,
}

/// How much of the patient's Conditions a score was checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionsRead {
    /// The whole search result (or, for a caller that builds [`Resources`] itself, what it
    /// gave).
    All,
    /// One page of a longer search ([`Resources::is_complete`]).
    OnePage,
    /// No answer to the Condition search ([`Resources::is_unread`]: not prefetched and not
    /// fetched, an OperationOutcome in its place, a failed fetch).
    None,
}

/// The outcome of [`assess`].
#[derive(Clone, Debug, PartialEq)]
pub enum Assessment {
    /// Every parameter has a usable value: the score.
    Scored(Box<Scored>),
    /// Something needed is missing or unusable: no score.
    Incomplete(Incomplete),
    /// NEWS2 is not validated for this patient: no score.
    NotApplicable(NotApplicable),
}

/// The Patient a call is about: the one whose id is `patient_id`, or the only one when it has
/// no id (or when the call names no patient). Never a Patient with another id: a prefetch
/// that holds someone else's record gives `None`. Several records of that id that differ
/// (two birth dates) give `None` too: which one is right cannot be told, and taking the
/// first would make the answer depend on the order the EHR sent them in.
pub fn find_patient<'a>(resources: &'a Resources, patient_id: Option<&str>) -> Option<&'a Patient> {
    match patient_id {
        Some(id) => {
            let mut named = resources
                .patients
                .iter()
                .filter(|p| p.id.as_deref() == Some(id));
            match (named.next(), resources.patients.as_slice()) {
                (Some(first), _) => named.all(|p| p == first).then_some(first),
                (None, [only]) if only.id.is_none() => Some(only),
                (None, _) => None,
            }
        }
        None => match resources.patients.as_slice() {
            [only] => Some(only),
            _ => None,
        },
    }
}

pub(crate) fn of_patient(
    subject: Option<&crate::fhir::Reference>,
    patient_id: Option<&str>,
) -> bool {
    match (patient_id, subject) {
        // A subject that is not a reference to this Patient (another one, a `urn:uuid:`,
        // or only an identifier or display, which cannot be matched) is not this patient's.
        (Some(want), Some(s)) => s.patient_id() == Some(want),
        // Without a subject it is no one's that can be told (an Observation without one
        // was scored as this patient's: a red-team finding).
        (Some(_), None) => false,
        (None, _) => true,
    }
}

fn pregnant(
    resources: &Resources,
    now: DateTime<Utc>,
    patient_id: Option<&str>,
    settings: &News2Settings,
) -> bool {
    // An active pregnancy Condition, or one whose clinical status cannot be read (an
    // encounter diagnosis without one) that may have been recorded within the window:
    // read as "not pregnant", such a record let NEWS2 score a pregnant patient (a red-team
    // finding).
    let window_start = now - settings.pregnancy_look_back;
    if resources.conditions.iter().any(|c| {
        of_patient(c.subject.as_ref(), patient_id)
            && (c.is_active_one_of(&settings.pregnancy_conditions)
                || (c.may_be_active_one_of(&settings.pregnancy_conditions, now)
                    && c.time_bounds().may_be_at_or_after(window_start)))
    }) {
        return true;
    }
    // The latest final pregnancy-status observation in the window. Pregnancy status is
    // recorded to the day (a date without a time is the usual form) or not dated at all:
    // such an answer counts where it may be in the window, and where it may be the latest,
    // "pregnant" wins (a "Pregnant" dated only yesterday was left out, and the patient
    // scored: a red-team finding).
    let candidates: Vec<(TimeBounds, &Observation)> = resources
        .observations
        .iter()
        .filter(|o| PREGNANCY_STATUS.iter().any(|c| o.code.has(LOINC, c)) && o.status.is_final())
        .filter(|o| of_patient(o.subject.as_ref(), patient_id))
        .map(|o| (o.time_bounds(), o))
        .filter(|(b, _)| {
            b.may_be_at_or_after(now - settings.pregnancy_look_back)
                && b.earliest()
                    .is_none_or(|t| t <= now + settings.vitals.future_skew)
        })
        .collect();
    let says_pregnant = |o: &Observation| {
        o.value_codeable_concept
            .as_ref()
            .is_some_and(|v: &CodeableConcept| {
                v.has(LOINC, "LA15173-0") || v.has(SNOMED, "77386006")
            })
    };
    // The one surely the latest is the one whose earliest time is the latest; every one
    // that may be as late as it may be the latest.
    let Some(latest_start) =
        candidates
            .iter()
            .map(|(b, _)| b.earliest())
            .max_by(|a, b| match (a, b) {
                (None, None) => std::cmp::Ordering::Equal,
                (None, Some(_)) => std::cmp::Ordering::Less,
                (Some(_), None) => std::cmp::Ordering::Greater,
                (Some(a), Some(b)) => a.cmp(b),
            })
    else {
        return false;
    };
    candidates
        .iter()
        .any(|(b, o)| latest_start.is_none_or(|t| b.may_be_at_or_after(t)) && says_pregnant(o))
}

/// NEWS2 for the patient whose resources these are, as of `now`.
///
/// `patient_id` (the CDS Hooks `context.patientId`): when given, resources of another
/// patient are left out and the Patient with that id is used.
pub fn assess(
    resources: &Resources,
    now: DateTime<Utc>,
    patient_id: Option<&str>,
    settings: &News2Settings,
) -> Assessment {
    // A patient recorded as deceased gets no score (one was scored "NEWS2 0 — low clinical
    // risk": a red-team finding).
    if find_patient(resources, patient_id).is_some_and(|p| p.is_deceased()) {
        return Assessment::NotApplicable(NotApplicable::Deceased);
    }
    let age = match find_patient(resources, patient_id) {
        None => Err(AgeProblem::NoPatient),
        Some(p) => match p.birth_date() {
            None => Err(AgeProblem::NoBirthDate),
            Some(Err(_)) => Err(AgeProblem::MalformedBirthDate),
            // Born after today: not a date of birth.
            Some(Ok(born)) if born.earliest() > now.date_naive() => {
                Err(AgeProblem::MalformedBirthDate)
            }
            Some(Ok(born)) => Ok(born.age_on(now.date_naive())),
        },
    };
    if let Ok((_, oldest)) = age
        && oldest < MINIMUM_AGE
    {
        return Assessment::NotApplicable(NotApplicable::UnderSixteen { age: oldest });
    }
    if pregnant(resources, now, patient_id, settings) {
        return Assessment::NotApplicable(NotApplicable::Pregnancy);
    }
    let age_problem = match age {
        Err(p) => Some(p),
        Ok((youngest, _)) if youngest < MINIMUM_AGE => Some(AgeProblem::Imprecise),
        Ok(_) => None,
    };
    let mut vitals = vitals::extract(&resources.observations, now, patient_id, &settings.vitals);
    // A value from a search read only in part is the latest only if what was not read is
    // no newer ([`Resources::observations_unread_after`]).
    // Only searches that may hold the parameter count (not a consciousness or pregnancy
    // search for a temperature).
    for p in Parameter::ALL {
        let may_hold = |codes: Option<&[_]>| vitals::parameters_of_codes(codes).contains(&p);
        vitals.doubt(p, UnusableReason::NewerMayBeUnread, |t| {
            resources.observations_unread_after(t, may_hold)
        });
        // None found, and what was not read reaches into the look-back window: one may be
        // there, not "none recorded" (a review's finding).
        if resources.observations_unread_after(now - settings.vitals.look_back, may_hold) {
            vitals.not_read(p, UnusableReason::MayBeUnread);
        }
    }
    // An Observation entry that could not be read may be a parameter's latest value: that
    // value is then not known (one older than the look-back window cannot be).
    for u in resources
        .unreadable
        .iter()
        .filter(|u| u.resource_type == "Observation")
        .filter(|u| u.time.is_none_or(|t| t >= now - settings.vitals.look_back))
    {
        for p in vitals::parameters_of(u) {
            let reason = if u.search {
                UnusableReason::SearchNotRead
            } else {
                UnusableReason::UnreadableObservation
            };
            vitals.doubt(p, reason.clone(), |t| u.time.is_none_or(|ut| ut >= t));
            // A search not read says nothing of a parameter it found nothing for either; nor
            // is a parameter whose only observation in the window could not be read (a value
            // written as a string, a status outside FHIR's codes) "not recorded" (a red-team
            // finding).
            vitals.not_read(p, reason);
        }
    }
    let unusable_params: Vec<Parameter> = vitals.unusable.iter().map(|u| u.parameter).collect();
    let missing: Vec<Parameter> = vitals
        .missing()
        .into_iter()
        .filter(|p| !unusable_params.contains(p))
        .collect();
    let inputs = match (
        &vitals.respiration_rate,
        &vitals.oxygen_saturation,
        &vitals.air_or_oxygen,
        &vitals.systolic_blood_pressure,
        &vitals.pulse_rate,
        &vitals.consciousness,
        &vitals.temperature,
        age_problem,
    ) {
        (Some(rr), Some(spo2), Some(o2), Some(sbp), Some(hr), Some(acvpu), Some(t), None) => {
            News2Inputs {
                respiration_rate: rr.value,
                spo2: spo2.value,
                air_or_oxygen: o2.value,
                systolic_blood_pressure: sbp.value,
                pulse: hr.value,
                consciousness: acvpu.value,
                temperature: t.value,
            }
        }
        _ => {
            return Assessment::Incomplete(Incomplete {
                missing,
                unusable: vitals.unusable,
                age: age_problem,
                future_dated: vitals.future_dated,
                newer_not_final: vitals.newer_not_final,
            });
        }
    };
    // Scale 2 (lower SpO2 targets) only on a confirmed Condition that surely holds now:
    // copies that disagree do not lower the score.
    let scale2 = resources.conditions.iter().any(|c| {
        of_patient(c.subject.as_ref(), patient_id)
            && c.is_confirmed_one_of(&settings.scale2_conditions, now)
            // Every copy of it (the same id, read twice) must say so too.
            && resources
                .condition_copies(c)
                .all(|other| other.is_confirmed_one_of(&settings.scale2_conditions, now))
            && !resources.condition_disputed(c)
    });
    let scale = if scale2 {
        SpO2Scale::Scale2
    } else {
        SpO2Scale::Scale1
    };
    Assessment::Scored(Box::new(Scored {
        score: score(&inputs, scale),
        inputs,
        vitals,
        conditions: if resources.is_unread("Condition") {
            ConditionsRead::None
        } else if !resources.is_complete("Condition") {
            ConditionsRead::OnePage
        } else {
            ConditionsRead::All
        },
        pregnancy_status_unread: resources.unreadable.iter().any(|u| {
            u.search
                && u.resource_type == "Observation"
                && PREGNANCY_STATUS.iter().any(|c| u.may_have_code(LOINC, c))
        }),
    }))
}
