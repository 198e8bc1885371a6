//! FHIR data → a tabular model's feature vector, by the bundle's declared sources
//! (`[[inputs.features]]` `code`, or `fhir` = `patient-age` | `patient-female` | `condition` |
//! `encounter-class`; see `docs/cds-hooks.md`), with no code per model.
//!
//! Rules:
//! - **Observation** (`code = "SYSTEM|CODE"`): the Observations (or components) with that
//!   code, `final`/`amended`/`corrected`, of this patient, dated within the look-back window
//!   (and not after `now` plus the skew). The **latest** decides; if its value cannot be used
//!   (unit not convertible to the feature's `unit`, a comparator, no value, no time, a time
//!   after `now` plus the skew — newer than any other, so the latest) the
//!   feature is missing with that reason — an older value is never taken in its place (as
//!   in [`crate::vitals`], whose unit reading this reuses). Conversions: identical UCUM
//!   units (annotations such as `{beats}` dropped), `kPa` ↔ `mm[Hg]`, `[degF]`/`K` → `Cel`,
//!   `cm` ↔ `mm`, `m` → `cm`, `g` ↔ `kg`.
//! - **patient-age**: whole years from `Patient.birthDate` to `now`; a birth date too
//!   imprecise to give one number (only a year, near the birthday) is missing.
//! - **patient-female**: `Patient.gender` female → 1, male → 0; other or absent: missing.
//! - **condition**: 1 when an active Condition of this patient has one of the codes
//!   ([`crate::fhir::Condition::is_active`]); 0 only when the patient's Conditions were read
//!   (a Condition search was prefetched or fetched) **in full** (no Bundle of Conditions
//!   was read in part: a `next` link, a `total` above its matches, an OperationOutcome
//!   saying results were left out, a match without its resource), else missing; missing
//!   too when a Condition that may hold has no code in the listed codes' systems (no code,
//!   text only, ICD-10 where SNOMED CT is listed). Codes match exactly (no subsumption).
//! - **encounter-class**: the current Encounter is the one named by `context.encounterId`
//!   (whatever its status but `entered-in-error` and `cancelled`, which are left out as if
//!   absent: a `finished` one is still the admission being assessed; one not among the
//!   Encounters read is missing, not absent), else the only Encounter under way (`arrived`,
//!   `triaged`, `in-progress`, `onleave`) of this patient; 1 when its class (HL7 v3 ActCode) is listed,
//!   else 0; no or several current Encounters, or no class: missing. Without an
//!   `encounterId`, Encounters read from one page of a longer search
//!   ([`crate::fhir::Resources::is_complete`]) are missing too: another in-progress one
//!   may be on the next page.
//! - A feature with no source is missing (never imputed).

use std::cmp::Ordering;
use std::fmt;

use chrono::{DateTime, Duration, Utc};
use nightingale_models::manifest::{FeatureSpec, FhirSource};

use crate::fhir::{ACT_CODE, LOINC, Observation, Quantity, Resources, SystemCode, later_reading};
use crate::news2::{find_patient, of_patient};
use crate::vitals::{UnusableReason, pending_reading, truncate, ucum};

/// What the mapping needs besides the resources.
#[derive(Clone, Debug)]
pub struct MappingContext<'a> {
    /// `context.patientId`.
    pub patient_id: &'a str,
    /// `context.encounterId`, when the hook gives one.
    pub encounter_id: Option<&'a str>,
    /// The time of the call.
    pub now: DateTime<Utc>,
    /// How far back an Observation may be.
    pub look_back: Duration,
    /// How far after `now` an Observation's time may be.
    pub future_skew: Duration,
    /// Whether the patient's Conditions were read (a Condition search was answered).
    pub conditions_read: bool,
}

/// Why a feature has no value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Missing {
    /// The bundle declares no FHIR source for it.
    NoSource,
    /// No Observation with the code within the look-back window.
    NoObservation,
    /// The latest Observation cannot be used.
    Unusable(UnusableReason),
    /// No Patient resource (or no birthDate / gender on it).
    NoPatientData(&'static str),
    /// `birthDate` is malformed or too imprecise for whole years.
    BirthDate,
    /// The patient's Conditions were not available.
    NoConditions,
    /// A Condition with one of the codes may hold, but its clinical status cannot be read
    /// (none, text only, another system's code).
    ConditionStatusUnknown,
    /// A Condition that may hold has no code in the systems of the feature's codes (no code,
    /// text only, or only codes of other systems, such as ICD-10 where SNOMED CT is
    /// listed): whether it is one of them cannot be told. The systems, as listed.
    ConditionUnclassified(String),
    /// No current Encounter could be told apart (none, several, or one without a class).
    Encounter(&'static str),
    /// Outside the range the bundle says the model was trained on (`min`/`max`): the model
    /// would extrapolate (an SBP of 1200 is a typing error, not a low risk), so the value is
    /// not used. `value` as shown, `range` with its unit.
    OutOfRange { value: String, range: String },
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::NoSource => f.write_str("no FHIR source declared by the model"),
            Missing::NoObservation => f.write_str("no recent result"),
            Missing::Unusable(r) => write!(f, "latest result unusable: {r}"),
            Missing::NoPatientData(what) => write!(f, "{what}"),
            Missing::BirthDate => f.write_str("birth date unusable for an age in years"),
            Missing::NoConditions => f.write_str("the patient's conditions were not available"),
            Missing::ConditionStatusUnknown => f.write_str(
                "a matching condition is recorded without a clinical status that can be read",
            ),
            Missing::ConditionUnclassified(systems) => write!(
                f,
                "a Condition that may be active could not be classified (no code in {systems}), \
                 so whether it is one of the listed conditions is not known"
            ),
            Missing::Encounter(why) => write!(f, "{why}"),
            Missing::OutOfRange { value, range } => write!(
                f,
                "{value} is outside the range the model was trained on, {range}"
            ),
        }
    }
}

/// One feature's value, or why it has none.
#[derive(Clone, Debug, PartialEq)]
pub struct MappedFeature {
    /// The feature's name (as the bundle declares it).
    pub name: String,
    /// Its unit (UCUM) as the model expects it.
    pub unit: String,
    /// The value in `unit`, or why it is missing.
    pub value: Result<f64, Missing>,
    /// The value as a clinician reads it ("88 mm[Hg]", "71 years", "female", "yes").
    pub shown: Option<String>,
    /// When it was observed (Observations only).
    pub time: Option<DateTime<Utc>>,
    /// The unit it was written in, when it was converted.
    pub converted_from: Option<String>,
    /// A reading newer than the one used (or than none) that is not final yet
    /// (`preliminary`, `registered`, `unknown`: a device's value before a nurse confirms
    /// it): `Some(Some(t))` taken at `t`, `Some(None)` one whose time cannot be read (it may
    /// be newer). Not used; the card names it, as the NEWS2 card does.
    pub newer_not_final: Option<Option<DateTime<Utc>>>,
}

/// The feature vector of one model for one patient.
#[derive(Clone, Debug, PartialEq)]
pub struct Mapped {
    pub features: Vec<MappedFeature>,
}

impl Mapped {
    /// The values in column order, when none is missing.
    pub fn values(&self) -> Option<Vec<f64>> {
        self.features
            .iter()
            .map(|f| f.value.as_ref().ok().copied())
            .collect()
    }

    /// The features (in plain words) with a reading newer than the one used that is not
    /// final yet, and its time when it can be read.
    pub fn newer_not_final(&self) -> Vec<(String, Option<DateTime<Utc>>)> {
        self.features
            .iter()
            .filter_map(|f| f.newer_not_final.map(|t| (plain_name(&f.name), t)))
            .collect()
    }

    /// Each missing feature with why ("pedigree (no FHIR source declared by the model)").
    pub fn missing(&self) -> Vec<String> {
        self.features
            .iter()
            .filter_map(|f| match &f.value {
                Err(m) => Some(format!("{} ({m})", plain_name(&f.name))),
                Ok(_) => None,
            })
            .collect()
    }
}

/// A feature name in plain words (`systolic_bp` → `systolic bp`).
pub fn plain_name(name: &str) -> String {
    name.replace('_', " ")
}

/// A value as a clinician reads it: to two decimals at most, trailing zeros dropped. A value
/// too large for two decimals to mean anything (1e308 overflowed when scaled by 100 and was
/// shown as "inf": a red-team finding) is shown in scientific notation as it is.
fn number(v: f64) -> String {
    if !v.is_finite() || v.abs() >= 1e15 {
        return format!("{v:e}");
    }
    // `+ 0.0`: a value that rounds to zero from below is "0", not "-0".
    let r = (v * 100.0).round() / 100.0 + 0.0;
    if r == r.trunc() {
        format!("{r:.0}")
    } else {
        format!("{r}")
    }
}

/// Maps the resources to the features, in column order.
pub fn map_features(
    features: &[FeatureSpec],
    resources: &Resources,
    context: &MappingContext<'_>,
) -> Mapped {
    Mapped {
        features: features
            .iter()
            .map(|f| map_one(f, resources, context))
            .collect(),
    }
}

fn map_one(f: &FeatureSpec, resources: &Resources, cx: &MappingContext<'_>) -> MappedFeature {
    let mut out = map_source(f, resources, cx);
    if let Ok(v) = out.value {
        let below = f.min.is_some_and(|min| v < min);
        let above = f.max.is_some_and(|max| v > max);
        if below || above {
            let unit = match f.unit.as_str() {
                "" | "1" => String::new(),
                // UCUM's year, as a reader says it.
                "a" => " years".to_owned(),
                u => format!(" {u}"),
            };
            let range = match (f.min, f.max) {
                (Some(min), Some(max)) => format!("{}–{}{unit}", number(min), number(max)),
                (Some(min), None) => format!("at least {}{unit}", number(min)),
                (None, Some(max)) => format!("at most {}{unit}", number(max)),
                (None, None) => unreachable!("a bound was crossed"),
            };
            // Shown to two decimals, a value just outside the range may read as its bound
            // ("56 mm[Hg] is outside … 56–212 mm[Hg]": a red-team finding): then it is
            // shown as it is.
            let crossed = if below { f.min } else { f.max };
            let value = match &out.shown {
                Some(shown) if crossed.is_none_or(|b| number(b) != number(v)) => shown.clone(),
                _ => format!("{v}{unit}"),
            };
            let value = match &out.converted_from {
                Some(from) => format!("{value} (converted from {from})"),
                None => value,
            };
            out.value = Err(Missing::OutOfRange { value, range });
        }
    }
    out
}

/// The feature's value from its declared source, before the range check of [`map_one`].
fn map_source(f: &FeatureSpec, resources: &Resources, cx: &MappingContext<'_>) -> MappedFeature {
    let mut out = MappedFeature {
        name: f.name.clone(),
        unit: f.unit.clone(),
        value: Err(Missing::NoSource),
        shown: None,
        time: None,
        converted_from: None,
        newer_not_final: None,
    };
    let patient = || find_patient(resources, Some(cx.patient_id));
    // Why there is no Patient to read: none of this id, or several of it that differ.
    let no_patient = || {
        if resources
            .patients
            .iter()
            .any(|p| p.id.as_deref() == Some(cx.patient_id))
        {
            Missing::NoPatientData("the EHR sent differing records of this Patient")
        } else {
            Missing::NoPatientData("no Patient resource")
        }
    };
    let flag = |out: &mut MappedFeature, yes: bool, shown_yes: &str, shown_no: &str| {
        out.value = Ok(if yes { 1.0 } else { 0.0 });
        out.shown = Some(if yes { shown_yes } else { shown_no }.to_owned());
    };
    match (f.code.as_deref(), f.fhir) {
        (Some(code), _) => match SystemCode::parse(code) {
            None => out.value = Err(Missing::NoSource),
            Some(code) => observation(&code, f, resources, cx, &mut out),
        },
        (None, None) => {}
        (None, Some(FhirSource::PatientAge)) => {
            out.value = match patient() {
                None => Err(no_patient()),
                Some(p) => match p.birth_date() {
                    None => Err(Missing::NoPatientData("no birth date on the Patient")),
                    Some(Err(_)) => Err(Missing::BirthDate),
                    Some(Ok(d)) => match d.age_on(cx.now.date_naive()) {
                        (lo, hi) if lo == hi && lo >= 0 => {
                            out.shown = Some(format!("{lo} years"));
                            Ok(f64::from(lo))
                        }
                        _ => Err(Missing::BirthDate),
                    },
                },
            }
        }
        (None, Some(FhirSource::PatientFemale)) => match patient().map(|p| p.gender) {
            None => out.value = Err(no_patient()),
            Some(Some(crate::fhir::Gender::Female)) => flag(&mut out, true, "female", "male"),
            Some(Some(crate::fhir::Gender::Male)) => flag(&mut out, false, "female", "male"),
            Some(_) => {
                out.value = Err(Missing::NoPatientData(
                    "the Patient's gender is neither female nor male",
                ))
            }
        },
        (None, Some(FhirSource::Condition)) => {
            let codes: Vec<SystemCode> = f
                .conditions
                .iter()
                .filter_map(|c| SystemCode::parse(c))
                .collect();
            let mine = || {
                resources
                    .conditions
                    .iter()
                    .filter(|c| of_patient(c.subject.as_ref(), Some(cx.patient_id)))
            };
            let disputed = |c: &crate::fhir::Condition| resources.condition_disputed(c);
            let present = mine().any(|c| c.is_active_one_of(&codes) && !disputed(c));
            // The systems the feature's codes are in (OID forms as their URIs): a Condition
            // that may hold and has no code in them (none, text only, ICD-10 where SNOMED CT
            // is listed) may be one of the listed conditions; it was read as "not that
            // condition", and the feature as "no" (a red-team finding). A Condition coded in
            // a listed system with another code is not one of them: codes are matched
            // exactly, without subsumption (a documented limit).
            let mut systems: Vec<&str> = codes
                .iter()
                .map(|c| crate::fhir::canonical_system(&c.system))
                .collect();
            systems.sort_unstable();
            systems.dedup();
            let unclassified = mine().any(|c| {
                c.activity_at(cx.now) != crate::fhir::Activity::Inactive
                    && !c.code.as_ref().is_some_and(|k| k.has_code_in(&systems))
            });
            // A matching Condition that may hold (its status cannot be read, or copies of it
            // disagree) is neither yes nor no.
            let maybe = mine().any(|c| {
                c.may_be_active_one_of(&codes, cx.now)
                    || (disputed(c) && c.code.as_ref().is_some_and(|k| k.has_any(&codes)))
            });
            // "No" needs every Condition: a search answered, and not one page of a longer
            // result ([`Resources::is_complete`]; the caller's `conditions_read` from
            // `Service::collect` already says so, this holds for any caller).
            let all_read = cx.conditions_read && resources.is_complete("Condition");
            if !present && maybe {
                out.value = Err(Missing::ConditionStatusUnknown);
            } else if !present && unclassified {
                out.value = Err(Missing::ConditionUnclassified(systems.join(" or ")));
            } else if present || all_read {
                flag(&mut out, present, "yes (active condition)", "no");
            } else {
                out.value = Err(Missing::NoConditions);
            }
        }
        (None, Some(FhirSource::EncounterClass)) => {
            // An `entered-in-error` Encounter never happened (it was recorded by mistake)
            // and a `cancelled` one never took place: neither is the admission being
            // assessed, whatever its class, so both are left out as if absent. A `finished`
            // Encounter named by `context.encounterId` is kept: it is still the admission
            // the user is looking at, and its class is still how the patient came in.
            let mine: Vec<_> = resources
                .encounters
                .iter()
                // The encounter in context may lack a subject (R4 allows it); any other
                // must be this patient's.
                .filter(|e| {
                    of_patient(e.subject.as_ref(), Some(cx.patient_id))
                        || (e.subject.is_none()
                            && cx.encounter_id.is_some()
                            && e.id.as_deref() == cx.encounter_id)
                })
                .filter(|e| !matches!(e.status.as_deref(), Some("entered-in-error" | "cancelled")))
                .collect();
            let current: Vec<_> = match cx.encounter_id {
                Some(id) => mine
                    .iter()
                    .filter(|e| e.id.as_deref() == Some(id))
                    .collect(),
                None => mine
                    .iter()
                    .filter(|e| {
                        matches!(
                            e.status.as_deref(),
                            Some("arrived" | "triaged" | "in-progress" | "onleave")
                        )
                    })
                    .collect(),
            };
            // "The only in-progress Encounter" holds only if every Encounter was read: with
            // one page of a longer search, another may be on the next.
            let partial = cx.encounter_id.is_none() && !resources.is_complete("Encounter");
            // An Encounter entry that could not be read (an R5 `class` list, a malformed
            // field) may be the current one: said as such, not as "one page of a longer
            // search" (a red-team finding).
            let unreadable = resources
                .unreadable
                .iter()
                .any(|u| u.resource_type == "Encounter" && !u.search);
            const UNREADABLE: &str = "an Encounter could not be read (a malformed field, such as \
                 a class written as a list), so the current encounter cannot be told";
            match current.as_slice() {
                _ if partial && unreadable => out.value = Err(Missing::Encounter(UNREADABLE)),
                _ if partial => {
                    out.value = Err(Missing::Encounter(
                        "the encounters were only partly available (one page of a longer \
                         search, or the FHIR server said some were left out)",
                    ))
                }
                // A search not read found no encounter, nor that there is none (it said "no
                // current encounter": a red-team finding).
                [] if resources.is_unread("Encounter") => {
                    out.value = Err(Missing::Encounter(
                        "the encounters were not available (the search was not answered or could not be read)",
                    ))
                }
                // The encounter in context may be the one that could not be read.
                [] if unreadable => out.value = Err(Missing::Encounter(UNREADABLE)),
                // The encounter in context is not among those read (the search returns
                // encounters under way; a finished one is not asked for): not known to be
                // absent (it was "no current encounter": a red-team finding).
                [] if cx.encounter_id.is_some_and(|id| {
                    !resources
                        .encounters
                        .iter()
                        .any(|e| e.id.as_deref() == Some(id))
                }) =>
                {
                    out.value = Err(Missing::Encounter(
                        "the encounter in context (context.encounterId) was not among the encounters read",
                    ))
                }
                [] => out.value = Err(Missing::Encounter("no current encounter")),
                [e] => match &e.class {
                    // A code of HL7 v3's encounter classes (ActEncounterCode), exactly: `emer`
                    // is none of them, and was read as "not emergency" (a red-team finding).
                    Some(class)
                        if class.system.as_deref().is_none_or(|s| s == ACT_CODE)
                            && class
                                .code
                                .as_deref()
                                .is_some_and(|c| ENCOUNTER_CLASSES.contains(&c)) =>
                    {
                        let code = class.code.as_deref().unwrap_or_default();
                        let yes = f.encounter_class.iter().any(|c| c == code);
                        out.value = Ok(if yes { 1.0 } else { 0.0 });
                        out.shown = Some(format!("{} encounter", truncate(code)));
                    }
                    _ => {
                        out.value = Err(Missing::Encounter(
                            "the current encounter has no class of HL7 v3's encounter classes (ActEncounterCode)",
                        ))
                    }
                },
                _ => out.value = Err(Missing::Encounter("several current encounters")),
            }
        }
    }
    out
}

/// HL7 v3 ActEncounterCode: the codes `Encounter.class` takes (FHIR R4's binding).
const ENCOUNTER_CLASSES: [&str; 11] = [
    "AMB", "EMER", "FLD", "HH", "IMP", "ACUTE", "NONAC", "OBSENC", "PRENC", "SS", "VR",
];

/// Converts a quantity to `unit`; the unit it was written in is returned when it differs.
pub fn convert(q: &Quantity, unit: &str) -> Result<(f64, Option<String>), UnusableReason> {
    convert_analyte(q, unit, None)
}

/// Mass concentrations in mg/L.
fn mass_per_litre(unit: &str) -> Option<f64> {
    Some(match unit {
        "mg/dL" => 10.0,
        "g/L" => 1000.0,
        "mg/L" => 1.0,
        _ => return None,
    })
}

/// Molar concentrations in mmol/L.
fn mmol_per_litre(unit: &str) -> Option<f64> {
    Some(match unit {
        "mmol/L" => 1.0,
        "umol/L" => 1e-3,
        "mol/L" => 1e3,
        _ => return None,
    })
}

/// [`convert`], and with the analyte's molar mass (g/mol) also between molar and mass
/// concentrations (mmol/L × g/mol = mg/L).
pub fn convert_analyte(
    q: &Quantity,
    unit: &str,
    molar_mass: Option<f64>,
) -> Result<(f64, Option<String>), UnusableReason> {
    let (v, bare, written) = ucum(q)?;
    let target = if unit.is_empty() { "1" } else { unit };
    if bare == target {
        return Ok((v, None));
    }
    if let Some(mm) = molar_mass {
        let value = match (
            mmol_per_litre(&bare),
            mass_per_litre(&bare),
            mmol_per_litre(target),
            mass_per_litre(target),
        ) {
            // molar → mass: mmol/L · g/mol = mg/L.
            (Some(from), _, _, Some(to)) => Some(v * from * mm / to),
            // mass → molar.
            (_, Some(from), Some(to), _) => Some(v * from / mm / to),
            (Some(from), _, Some(to), _) => Some(v * from / to),
            (_, Some(from), _, Some(to)) => Some(v * from / to),
            _ => None,
        };
        if let Some(value) = value {
            if !value.is_finite() {
                return Err(UnusableReason::Implausible);
            }
            return Ok((value, Some(truncate(&written))));
        }
    }
    let value = match (bare.as_str(), target) {
        ("kPa", "mm[Hg]") => v * 7.500_617,
        ("mm[Hg]", "kPa") => v / 7.500_617,
        ("[degF]", "Cel") => (v - 32.0) * 5.0 / 9.0,
        ("K", "Cel") => v - 273.15,
        ("cm", "mm") => v * 10.0,
        ("mm", "cm") => v / 10.0,
        ("m", "cm") => v * 100.0,
        ("g", "kg") => v / 1000.0,
        ("kg", "g") => v * 1000.0,
        _ => return Err(UnusableReason::Unit(truncate(&written))),
    };
    // A finite value can overflow in the conversion (1e308 kPa): implausible, not infinite.
    if !value.is_finite() {
        return Err(UnusableReason::Implausible);
    }
    Ok((value, Some(truncate(&written))))
}

fn observation(
    code: &SystemCode,
    feature: &FeatureSpec,
    resources: &Resources,
    cx: &MappingContext<'_>,
    out: &mut MappedFeature,
) {
    let unit = feature.unit.as_str();
    let look_back = feature
        .look_back_hours
        .map_or(cx.look_back, |h| Duration::seconds((h * 3600.0) as i64));
    // (time, issued) of the latest, with its value or why it is unusable, and the latest
    // time it may have been made (`None`: any).
    type Found<'a> = (
        Option<DateTime<Utc>>,
        Option<DateTime<Utc>>,
        Result<&'a Quantity, UnusableReason>,
        Option<DateTime<Utc>>,
    );
    let mut best: Option<Found<'_>> = None;
    // Of one time and issue time, values that differ (after conversion) make the feature
    // missing whatever their order (taken by its place in the Bundle, a heart rate of 80
    // beside one of 180 gave either risk: a red-team finding); equal ones count once.
    let convert = |q: &Result<&Quantity, UnusableReason>| {
        q.clone()
            .and_then(|q| convert_analyte(q, unit, feature.molar_mass))
            .map(|(v, _)| v)
            .ok()
    };
    let mut conflicting = false;
    let mut dated: Vec<Found<'_>> = vec![];
    // Readings of this code not final yet (their times; `None`: cannot be read).
    let mut pending: Vec<Option<DateTime<Utc>>> = vec![];
    let family = codes_of(code);
    for o in &resources.observations {
        let Some(quantity) = value_with_code(o, &family) else {
            continue;
        };
        if !of_patient(o.subject.as_ref(), Some(cx.patient_id)) {
            continue;
        }
        if !o.status.is_final() {
            // One that may still become final is not used, but named on the card when it
            // is newer than the value used (risk cards left it out without a word).
            if let Some(time) = pending_reading(o, cx.now, look_back) {
                pending.push(time);
            }
            continue;
        }
        let (time, quantity) = match o.effective() {
            // Dated beyond the skew: newer than anything in the window, so it stays the
            // latest and makes the feature missing (as in `crate::vitals`): the older
            // value is never used in its place.
            Ok(Some((t, _))) if t > cx.now + cx.future_skew => {
                (Some(t), Err(UnusableReason::FutureTime))
            }
            Ok(Some((t, _))) => {
                if t < cx.now - look_back {
                    continue;
                }
                (Some(t), quantity)
            }
            Ok(None) => (None, Err(UnusableReason::NoTime)),
            Err(e) => (None, Err(UnusableReason::Time(e))),
        };
        // Without a usable time it is unusable, and the latest unless a dated value is
        // surely later ([`later_reading`]) or its date (in any zone) ended before the window.
        let latest_possible = match time {
            Some(t) => Some(t),
            None => o.time_bounds().latest(),
        };
        if time.is_none() && latest_possible.is_some_and(|l| l < cx.now - look_back) {
            continue;
        }
        let candidate = (time, o.issued(), quantity, latest_possible);
        if time.is_some() {
            dated.push(candidate.clone());
        }
        let order = |c: &Found<'_>, b: &Found<'_>| later_reading((c.0, c.3, c.1), (b.0, b.3, b.1));
        match &best {
            Some(b) if order(&candidate, b) == Ordering::Less => {}
            Some(b) if order(&candidate, b) == Ordering::Equal => {
                if b.0.is_some() && convert(&b.2) != convert(&candidate.2) {
                    conflicting = true;
                }
            }
            _ => {
                best = Some(candidate);
                conflicting = false;
            }
        }
    }
    out.newer_not_final = newer_not_final(&pending, best.as_ref().and_then(|b| b.0));
    // A search that may hold this code was asked for and not read: "no result" is not known.
    // Whether a search's codes (none: not by code) may find this feature.
    let may_hold = |codes: Option<&[crate::fhir::CodeableConcept]>| {
        codes.is_none_or(|cs| {
            cs.iter()
                .any(|c| has_any(c, &family) || is_panel_of(c, code))
        })
    };
    let search_not_read = resources
        .unreadable
        .iter()
        .any(|u| u.search && u.resource_type == "Observation" && may_hold(u.codes.as_deref()));
    // Of one time, the later issued is a correction only if both say when they were
    // issued: a value of the latest's time that differs from it, where one of the two has no
    // issue time, makes the feature missing (an SBP of 60 issued beside a 120 that said
    // nothing won, and with the issue times swapped the 120 won: a red-team finding).
    if let Some(b) = &best
        && b.0.is_some()
        && dated.iter().any(|c| {
            c.0 == b.0 && (c.1.is_none() || b.1.is_none()) && convert(&c.2) != convert(&b.2)
        })
    {
        conflicting = true;
    }
    let Some((time, _, quantity, _)) = best else {
        // None found, and what a search read in part did not read reaches into the look-back
        // window: one may be there, not "no recent result" (a review's finding).
        let may_be_unread = resources.observations_unread_after(cx.now - look_back, may_hold);
        // An entry that could not be read (a value written as a string, a status outside
        // FHIR's codes) that may be of this code and in the window may be the latest: it was
        // "no recent result" when it was the only one of its code (a red-team finding).
        let unreadable = resources.unreadable.iter().any(|u| {
            !u.search
                && u.resource_type == "Observation"
                && family.iter().any(|c| u.may_have_code(&c.system, &c.code))
                && u.time.is_none_or(|ut| ut >= cx.now - look_back)
        });
        out.value = Err(if search_not_read {
            Missing::Unusable(UnusableReason::SearchNotRead)
        } else if unreadable {
            Missing::Unusable(UnusableReason::UnreadableObservation)
        } else if may_be_unread {
            Missing::Unusable(UnusableReason::MayBeUnread)
        } else {
            Missing::NoObservation
        });
        return;
    };
    out.time = time;
    if conflicting {
        out.value = Err(Missing::Unusable(UnusableReason::Conflicting));
        return;
    }
    // From a search read in part, the latest found is the latest only if what was not read
    // is no newer ([`Resources::observations_unread_after`]).
    if time.is_some_and(|t| resources.observations_unread_after(t, may_hold)) {
        out.value = Err(Missing::Unusable(UnusableReason::NewerMayBeUnread));
        return;
    }
    // An Observation entry that could not be read, of this code (or of unknown code), as
    // recent as the latest found or undated: the latest value is not known.
    if search_not_read {
        out.value = Err(Missing::Unusable(UnusableReason::SearchNotRead));
        return;
    }
    if resources.unreadable.iter().any(|u| {
        u.resource_type == "Observation"
            && family.iter().any(|c| u.may_have_code(&c.system, &c.code))
            && u.time.is_none_or(|ut| time.is_none_or(|t| ut >= t))
    }) {
        out.value = Err(Missing::Unusable(UnusableReason::UnreadableObservation));
        return;
    }
    match quantity.and_then(|q| convert_analyte(q, unit, feature.molar_mass)) {
        Ok((v, from)) => {
            out.value = Ok(v);
            out.shown = Some(if unit.is_empty() || unit == "1" {
                number(v)
            } else {
                format!("{} {unit}", number(v))
            });
            out.converted_from = from;
        }
        Err(reason) => out.value = Err(Missing::Unusable(reason)),
    }
}

/// Of the times of readings not final yet, the newest known one later than `used` (any, when
/// no value with a time was used), else one whose time cannot be read (it may be newer).
fn newer_not_final(
    pending: &[Option<DateTime<Utc>>],
    used: Option<DateTime<Utc>>,
) -> Option<Option<DateTime<Utc>>> {
    match pending
        .iter()
        .flatten()
        .filter(|t| used.is_none_or(|u| **t > u))
        .max()
    {
        Some(t) => Some(Some(*t)),
        None if pending.iter().any(Option::is_none) => Some(None),
        None => None,
    }
}

/// Whether `c` is a blood-pressure panel (LOINC 85354-9, 55284-4) and `code` one of its
/// pressures (8480-6, 8462-4): a search of the panel may hold that value as a component.
fn is_panel_of(c: &crate::fhir::CodeableConcept, code: &SystemCode) -> bool {
    crate::service::BP_COMPONENTS.contains(&format!("{}|{}", code.system, code.code).as_str())
        && crate::service::is_bp_panel(c)
}

/// `code`, and the LOINC codes charting the same vital sign ([`crate::vitals::loinc_family`]).
pub(crate) fn codes_of(code: &SystemCode) -> Vec<SystemCode> {
    match (code.system == LOINC)
        .then(|| crate::vitals::loinc_family(&code.code))
        .flatten()
    {
        Some(family) => family.iter().map(|c| SystemCode::new(LOINC, c)).collect(),
        None => vec![code.clone()],
    }
}

/// Whether `c` has any of `codes`.
fn has_any(c: &crate::fhir::CodeableConcept, codes: &[SystemCode]) -> bool {
    codes.iter().any(|code| c.has(&code.system, &code.code))
}

/// The quantity of `o` (or of its component) coded one of `codes`; `Some(Err)` when coded so
/// but without a usable quantity (none, or one given with a `dataAbsentReason`).
fn value_with_code<'a>(
    o: &'a Observation,
    codes: &[SystemCode],
) -> Option<Result<&'a Quantity, UnusableReason>> {
    let present = |q: &'a Quantity, absent: bool| {
        if absent {
            Err(UnusableReason::AbsentReasonWithValue)
        } else {
            Ok(q)
        }
    };
    if has_any(&o.code, codes)
        && let Some(q) = &o.value_quantity
    {
        return Some(present(q, o.data_absent_reason.is_some()));
    }
    // Of several components with the code, one value only: two that differ make it
    // unusable, whatever their order (the first taken, a panel with systolic components
    // of 120 and 70 gave either risk by their order: a red-team finding).
    let mut components = o.component.iter().filter(|c| has_any(&c.code, codes));
    let Some(first) = components.next() else {
        return has_any(&o.code, codes).then_some(Err(UnusableReason::NoValue));
    };
    if components.any(|c| c.value_quantity != first.value_quantity) {
        return Some(Err(UnusableReason::Conflicting));
    }
    Some(
        first
            .value_quantity
            .as_ref()
            .ok_or(UnusableReason::NoValue)
            .and_then(|q| present(q, first.data_absent_reason.is_some())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::{DateError, Limits, Resource};
    use serde_json::{Value, json};

    fn resources(items: Vec<Value>) -> Resources {
        let mut r = Resources::new();
        for v in items {
            r.add(Resource::from_value(&v, &Limits::default()).unwrap());
        }
        r
    }

    fn features() -> Vec<FeatureSpec> {
        crate::test_support::features(&[
            "age",
            "systolic_bp",
            "female",
            "infection",
            "emergency",
            "pedigree",
        ])
    }

    fn context(conditions_read: bool) -> MappingContext<'static> {
        crate::test_support::mapping_context(conditions_read)
    }

    fn sbp(value: f64, unit: &str, time: &str) -> Value {
        json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
            "subject": {"reference": "Patient/p1"}, "effectiveDateTime": time,
            "valueQuantity": {"value": value, "system": "http://unitsofmeasure.org", "code": unit}})
    }

    /// A feature declared with the profile's code reads the newest value of any code that
    /// charts the same vital sign (a newer systolic of 80 charted sitting, 8459-0, was passed
    /// over for a 140 from ten hours before under 8480-6: a red-team finding); a search
    /// for the feature asks for them too.
    #[test]
    fn a_newer_value_under_a_code_of_the_same_vital_sign_is_the_value() {
        for code in ["8459-0", "8460-8", "8461-6", "76534-7"] {
            let mut newer = sbp(80.0, "mm[Hg]", "2024-05-01T11:55:00Z");
            newer["code"]["coding"][0]["code"] = json!(code);
            let mut items = base();
            items.push(sbp(140.0, "mm[Hg]", "2024-05-01T02:00:00Z"));
            items.push(newer);
            let m = map_features(&features(), &resources(items), &context(true));
            assert_eq!(value_of(&m, "systolic_bp"), Ok(80.0), "{code}");
        }
        let prefetch = crate::service::risk_prefetch(&features());
        let search = &prefetch["observations"];
        for code in ["8480-6", "8459-0", "76534-7", "85354-9"] {
            assert!(
                search.contains(&format!("http://loinc.org|{code}")),
                "{search}"
            );
        }
    }

    fn base() -> Vec<Value> {
        vec![
            json!({"resourceType": "Patient", "id": "p1", "birthDate": "1950-06-15", "gender": "female"}),
            json!({"resourceType": "Condition", "subject": {"reference": "Patient/p1"},
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "91302008"}]}}),
            json!({"resourceType": "Encounter", "id": "e1", "status": "in-progress",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EMER"},
                "subject": {"reference": "Patient/p1"}}),
        ]
    }

    /// Red-team finding: a Condition search answered by an empty page of a longer result
    /// (a `total` above its entries) cast doubt on every feature, the vital signs too. Added
    /// as the answer of a Condition search, it leaves the Conditions alone in doubt.
    #[test]
    fn an_empty_page_of_a_condition_search_leaves_only_the_conditions_in_doubt() {
        let items = vec![
            base()[0].clone(),
            base()[2].clone(),
            sbp(120.0, "mm[Hg]", "2024-05-01T11:00:00Z"),
        ];
        let page = json!({"resourceType": "Bundle", "type": "searchset", "total": 5, "entry": []});
        let page = Resource::from_value(&page, &Limits::default()).unwrap();
        let mut r = resources(items.clone());
        r.add_search_answer(page.clone(), "Condition", None);
        let m = map_features(&features(), &r, &context(true));
        assert_eq!(value_of(&m, "systolic_bp"), Ok(120.0));
        assert_eq!(value_of(&m, "infection"), Err(Missing::NoConditions));
        // not said what it answered: every type in doubt, as before
        let mut r = resources(items);
        r.add(page);
        let m = map_features(&features(), &r, &context(true));
        assert!(value_of(&m, "systolic_bp").is_err());
    }

    /// A reading not final yet is not used; one newer than the value used (or of a time
    /// that cannot be read) is named (risk cards left it out without a word); an older one,
    /// one entered in error or cancelled, or another patient's, is not.
    #[test]
    fn a_newer_reading_not_yet_final_is_named_not_used() {
        let not_final = |status: &str, time: Option<&str>, patient: &str| {
            let mut o = sbp(190.0, "mm[Hg]", time.unwrap_or("2024-05-01T11:00:00Z"));
            o["status"] = json!(status);
            o["subject"] = json!({"reference": format!("Patient/{patient}")});
            if time.is_none() {
                o.as_object_mut().unwrap().remove("effectiveDateTime");
            }
            o
        };
        let map = |extra: Vec<Value>| {
            let mut items = base();
            items.push(sbp(120.0, "mm[Hg]", "2024-05-01T10:00:00Z"));
            items.extend(extra);
            let m = map_features(&features(), &resources(items), &context(true));
            (value_of(&m, "systolic_bp"), m.newer_not_final())
        };
        let at = |s: &str| Some(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc));
        for status in ["preliminary", "registered", "unknown"] {
            let (value, newer) = map(vec![not_final(status, Some("2024-05-01T11:00:00Z"), "p1")]);
            assert_eq!(value, Ok(120.0), "{status}");
            assert_eq!(
                newer,
                vec![("systolic bp".to_owned(), at("2024-05-01T11:00:00Z"))],
                "{status}"
            );
        }
        // Of several, the newest known time.
        let (_, newer) = map(vec![
            not_final("preliminary", Some("2024-05-01T10:30:00Z"), "p1"),
            not_final("preliminary", Some("2024-05-01T11:30:00Z"), "p1"),
            not_final("preliminary", None, "p1"),
        ]);
        assert_eq!(
            newer,
            vec![("systolic bp".to_owned(), at("2024-05-01T11:30:00Z"))]
        );
        // Dated in the future (a device's clock running fast): named at its time.
        let (value, newer) = map(vec![not_final(
            "preliminary",
            Some("2024-05-01T13:00:00Z"),
            "p1",
        )]);
        assert_eq!(value, Ok(120.0));
        assert_eq!(
            newer,
            vec![("systolic bp".to_owned(), at("2024-05-01T13:00:00Z"))]
        );
        // Of a time that cannot be read: it may be newer.
        let (value, newer) = map(vec![not_final("preliminary", None, "p1")]);
        assert_eq!(value, Ok(120.0));
        assert_eq!(newer, vec![("systolic bp".to_owned(), None)]);
        for quiet in [
            not_final("preliminary", Some("2024-05-01T09:00:00Z"), "p1"),
            not_final("entered-in-error", Some("2024-05-01T11:00:00Z"), "p1"),
            not_final("cancelled", Some("2024-05-01T11:00:00Z"), "p1"),
            not_final("preliminary", Some("2024-05-01T11:00:00Z"), "p2"),
        ] {
            let (value, newer) = map(vec![quiet.clone()]);
            assert_eq!(value, Ok(120.0));
            assert!(newer.is_empty(), "{quiet}");
        }
    }

    #[test]
    fn a_conversion_that_overflows_is_implausible_not_infinite() {
        let mut items = base();
        items.push(sbp(1e308, "kPa", "2024-05-01T10:00:00Z"));
        let m = map_features(&features(), &resources(items), &context(true));
        let value = m.features[1].value.clone();
        assert!(
            matches!(&value, Err(Missing::Unusable(UnusableReason::Implausible))),
            "{value:?}"
        );
    }

    #[test]
    fn values_of_one_time_that_differ_are_missing_whatever_their_order() {
        let t = "2024-05-01T10:00:00Z";
        for order in [[120.0, 180.0], [180.0, 120.0]] {
            let mut items = base();
            items.extend(order.iter().map(|&v| sbp(v, "mm[Hg]", t)));
            let m = map_features(&features(), &resources(items), &context(true));
            assert_eq!(
                m.features[1].value,
                Err(Missing::Unusable(UnusableReason::Conflicting))
            );
        }
        // The same value twice (12 kPa is 90.007 mm[Hg]: the same after conversion), or a
        // later one beside the pair: used.
        let mut items = base();
        items.extend([sbp(12.0, "kPa", t), sbp(12.0, "kPa", t)]);
        let m = map_features(&features(), &resources(items), &context(true));
        assert!(m.features[1].value.is_ok(), "{:?}", m.features[1].value);
        let mut items = base();
        items.extend([
            sbp(120.0, "mm[Hg]", t),
            sbp(180.0, "mm[Hg]", t),
            sbp(130.0, "mm[Hg]", "2024-05-01T10:30:00Z"),
        ]);
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(m.features[1].value, Ok(130.0));
    }

    #[test]
    fn a_value_dated_only_by_its_day_is_never_passed_over_for_an_older_one() {
        // SBP 120 at 11:30, and an SBP of 60 dated only today (or timed without a zone, or
        // not dated at all): it may be the latest, so the feature is unusable, not 120.
        for (time, reason) in [
            (Some("2024-05-01"), UnusableReason::Time(DateError::NoTime)),
            (
                Some("2024-05-01T11:50:00"),
                UnusableReason::Time(DateError::Malformed),
            ),
            (None, UnusableReason::NoTime),
        ] {
            let mut undated = sbp(60.0, "mm[Hg]", "");
            match time {
                Some(t) => undated["effectiveDateTime"] = json!(t),
                None => {
                    undated.as_object_mut().unwrap().remove("effectiveDateTime");
                }
            }
            for order in [0, 1] {
                let mut items = base();
                let pair = [
                    sbp(120.0, "mm[Hg]", "2024-05-01T11:30:00Z"),
                    undated.clone(),
                ];
                items.extend(if order == 0 {
                    pair.to_vec()
                } else {
                    pair.into_iter().rev().collect()
                });
                let m = map_features(&features(), &resources(items), &context(true));
                assert_eq!(
                    m.features[1].value,
                    Err(Missing::Unusable(reason.clone())),
                    "{time:?}"
                );
            }
        }
        // A date that ended (in every zone) before the dated value was made: the dated one.
        let mut items = base();
        items.extend([
            sbp(120.0, "mm[Hg]", "2024-05-01T11:30:00Z"),
            sbp(60.0, "mm[Hg]", "2024-04-30"),
        ]);
        // 30 April ends at 12:00 UTC on 1 May at the latest (UTC-12:00): 11:30 may be earlier.
        let m = map_features(&features(), &resources(items), &context(true));
        assert!(m.features[1].value.is_err());
        let mut items = base();
        items.extend([
            sbp(120.0, "mm[Hg]", "2024-05-01T11:30:00Z"),
            sbp(60.0, "mm[Hg]", "2024-04-29"),
        ]);
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(m.features[1].value, Ok(120.0));
        // Alone, a day that ended before the look-back window: no observation.
        let mut items = base();
        items.push(sbp(60.0, "mm[Hg]", "2024-04-20"));
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(m.features[1].value, Err(Missing::NoObservation));
    }

    #[test]
    fn an_encounter_search_not_read_is_not_no_encounter() {
        use crate::fhir::Unreadable;
        let items: Vec<Value> = base()
            .into_iter()
            .filter(|v| v["resourceType"] != "Encounter")
            .collect();
        let mut r = resources(items);
        let emergency = |r: &Resources| {
            map_features(&features(), r, &context(true)).features[4]
                .value
                .clone()
        };
        assert_eq!(
            emergency(&r),
            Err(Missing::Encounter("no current encounter"))
        );
        r.add_unread_search(Unreadable::search("Encounter", None));
        let value = emergency(&r);
        assert!(
            matches!(&value, Err(Missing::Encounter(why)) if why.contains("could not be read")),
            "{value:?}"
        );
    }

    #[test]
    fn a_search_that_could_not_be_read_leaves_its_codes_unknown() {
        use crate::fhir::{CodeableConcept, Unreadable};
        let failed = |codes: Option<Vec<CodeableConcept>>| {
            let mut items = base();
            items.push(sbp(120.0, "mm[Hg]", "2024-05-01T10:00:00Z"));
            let mut r = resources(items);
            r.add_unread_search(Unreadable::search("Observation", codes));
            map_features(&features(), &r, &context(true)).features[1]
                .value
                .clone()
        };
        let unknown = Err(Missing::Unusable(UnusableReason::SearchNotRead));
        // Of the feature's code, of its panel, or of any code: the value is not known.
        assert_eq!(failed(None), unknown);
        assert_eq!(
            failed(Some(vec![CodeableConcept::of(
                crate::fhir::LOINC,
                "8480-6"
            )])),
            unknown
        );
        assert_eq!(
            failed(Some(vec![CodeableConcept::of(
                crate::fhir::LOINC,
                "85354-9"
            )])),
            unknown
        );
        // Of other codes only: the value found is used.
        assert_eq!(
            failed(Some(vec![CodeableConcept::of(
                crate::fhir::LOINC,
                "8867-4"
            )])),
            Ok(120.0)
        );
        // Nothing found and the search not read: not "no observation".
        let mut r = resources(base());
        r.add_unread_search(Unreadable::search("Observation", None));
        assert_eq!(
            map_features(&features(), &r, &context(true)).features[1].value,
            unknown
        );
    }

    #[test]
    fn every_source_kind() {
        let mut items = base();
        items.push(sbp(12.0, "kPa", "2024-05-01T10:00:00Z"));
        let m = map_features(&features(), &resources(items), &context(true));
        let v: Vec<Result<f64, Missing>> = m.features.iter().map(|f| f.value.clone()).collect();
        // 1950-06-15 to 2024-05-01: 73 whole years.
        assert_eq!(v[0], Ok(73.0));
        // 12 kPa × 7.500617 mmHg/kPa.
        assert!((v[1].clone().unwrap() - 90.007_404).abs() < 1e-9);
        assert_eq!(m.features[1].converted_from.as_deref(), Some("kPa"));
        assert_eq!(&v[2..5], &[Ok(1.0), Ok(1.0), Ok(1.0)]);
        assert_eq!(v[5], Err(Missing::NoSource));
        assert_eq!(m.values(), None);
        assert_eq!(
            m.missing(),
            vec!["pedigree (no FHIR source declared by the model)"]
        );
    }

    #[test]
    fn a_value_outside_the_training_range_is_not_used() {
        let mut specs = features();
        // The ranges the icu-mortality bundle declares for these two.
        specs[0].min = Some(16.0);
        specs[0].max = Some(92.0);
        specs[1].min = Some(56.0);
        specs[1].max = Some(212.0);
        let mapped = |sbp_mm_hg: f64| {
            let mut items = base();
            items.push(sbp(sbp_mm_hg, "mm[Hg]", "2024-05-01T10:00:00Z"));
            map_features(&specs, &resources(items), &context(true))
        };
        // In range, the bounds included.
        for ok in [56.0, 120.0, 212.0] {
            assert_eq!(mapped(ok).features[1].value, Ok(ok));
        }
        // A typing error (1200 for 120) or a sign error is not a low or a high risk.
        for (bad, shown) in [
            (1200.0, "1200 mm[Hg]"),
            (-80.0, "-80 mm[Hg]"),
            (212.5, "212.5 mm[Hg]"),
        ] {
            let m = mapped(bad);
            let err = Missing::OutOfRange {
                value: shown.into(),
                range: "56–212 mm[Hg]".into(),
            };
            assert_eq!(m.features[1].value, Err(err));
            let why = format!(
                "systolic bp ({shown} is outside the range the model was trained on, 56–212 mm[Hg])"
            );
            assert!(m.missing().contains(&why), "{:?}", m.missing());
        }
        // Age 73 is within 16–92; a converted value is checked in the model's unit.
        let mut items = base();
        items.push(sbp(40.0, "kPa", "2024-05-01T10:00:00Z"));
        let m = map_features(&specs, &resources(items), &context(true));
        assert_eq!(m.features[0].value, Ok(73.0));
        assert!(matches!(
            m.features[1].value,
            Err(Missing::OutOfRange { .. })
        ));
        specs[0].max = Some(60.0);
        let m = map_features(&specs, &resources(base()), &context(true));
        assert_eq!(
            m.features[0].value,
            Err(Missing::OutOfRange {
                value: "73 years".into(),
                range: "16–60 years".into()
            })
        );
        // Red-team finding: a value that rounds to its bound is shown as it is, with the
        // unit it was converted from (7.466 kPa is 55.9996 mm[Hg], not "56 mm[Hg] outside
        // 56–212 mm[Hg]").
        let mut items = base();
        items.push(sbp(7.466, "kPa", "2024-05-01T11:50:00Z"));
        let m = map_features(&specs, &resources(items), &context(true));
        let Err(Missing::OutOfRange { value, range }) = &m.features[1].value else {
            panic!("{:?}", m.features[1]);
        };
        assert_eq!(range, "56–212 mm[Hg]");
        assert!(
            value.starts_with("55.99") && value.ends_with(" mm[Hg] (converted from kPa)"),
            "{value}"
        );
    }

    #[test]
    fn molar_units_with_a_molar_mass_and_a_look_back_of_its_own() {
        let glucose = |value: f64, unit: &str, time: &str| {
            json!({"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "1518-0"}]},
                "subject": {"reference": "Patient/p1"}, "effectiveDateTime": time,
                "valueQuantity": {"value": value, "system": "http://unitsofmeasure.org", "code": unit}})
        };
        #[derive(serde::Deserialize)]
        struct Doc {
            f: Vec<FeatureSpec>,
        }
        let spec = |extra: &str| {
            toml::from_str::<Doc>(&format!(
                "[[f]]\nname = \"glucose\"\nunit = \"mg/dL\"\ncode = \"http://loinc.org|1518-0\"\n{extra}"
            ))
            .unwrap()
            .f
        };
        // A UK laboratory writes mmol/L: 7.8 mmol/L × 180.156 g/mol = 140.52 mg/dL.
        let items = vec![glucose(7.8, "mmol/L", "2024-05-01T09:00:00Z")];
        let m = map_features(
            &spec("molar_mass = 180.156"),
            &resources(items.clone()),
            &context(true),
        );
        let v = m.features[0].value.clone().unwrap();
        assert!((v - 7.8 * 18.0156).abs() < 1e-9, "{v}");
        assert_eq!(m.features[0].converted_from.as_deref(), Some("mmol/L"));
        // Without a molar mass the unit cannot be converted: missing, never guessed.
        let m = map_features(&spec(""), &resources(items), &context(true));
        assert_eq!(
            m.features[0].value,
            Err(Missing::Unusable(UnusableReason::Unit("mmol/L".into())))
        );
        // Mass to molar: 100 mg/dL = 1000 mg/L / 180.156 g/mol = 5.5508 mmol/L.
        let q: Quantity = serde_json::from_value(
            json!({"value": 100.0, "system": "http://unitsofmeasure.org", "code": "mg/dL"}),
        )
        .unwrap();
        let (v, _) = convert_analyte(&q, "mmol/L", Some(180.156)).unwrap();
        assert!((v - 1000.0 / 180.156).abs() < 1e-12);
        // A test from three weeks ago: outside the service's 12 hours, inside the feature's
        // own 30 days.
        let old = vec![glucose(140.0, "mg/dL", "2024-04-10T09:00:00Z")];
        let m = map_features(&spec(""), &resources(old.clone()), &context(true));
        assert_eq!(m.features[0].value, Err(Missing::NoObservation));
        let m = map_features(
            &spec("look_back_hours = 720"),
            &resources(old),
            &context(true),
        );
        assert_eq!(m.features[0].value, Ok(140.0));
    }

    #[test]
    fn zero_only_when_the_data_was_read() {
        let items = vec![
            json!({"resourceType": "Patient", "id": "p1", "birthDate": "1950-06-15", "gender": "male"}),
            json!({"resourceType": "Encounter", "id": "e1", "status": "in-progress",
                "class": {"code": "IMP"}, "subject": {"reference": "Patient/p1"}}),
        ];
        let m = map_features(&features(), &resources(items.clone()), &context(true));
        assert_eq!(m.features[2].value, Ok(0.0));
        assert_eq!(m.features[3].value, Ok(0.0));
        assert_eq!(m.features[4].value, Ok(0.0));
        assert_eq!(m.features[1].value, Err(Missing::NoObservation));
        let m = map_features(&features(), &resources(items), &context(false));
        assert_eq!(m.features[3].value, Err(Missing::NoConditions));
    }

    #[test]
    fn the_latest_decides_and_an_unusable_latest_is_missing() {
        let mut items = base();
        items.push(sbp(120.0, "mm[Hg]", "2024-05-01T08:00:00Z"));
        items.push(sbp(88.0, "mm[Hg]", "2024-05-01T11:00:00Z"));
        // Older than 12 hours: left out.
        items.push(sbp(200.0, "mm[Hg]", "2024-04-30T20:00:00Z"));
        let m = map_features(&features(), &resources(items.clone()), &context(true));
        assert_eq!(m.features[1].value, Ok(88.0));
        assert_eq!(m.features[1].shown.as_deref(), Some("88 mm[Hg]"));
        // Dated 20 minutes ahead (beyond the 5-minute skew): the newest, unusable; the 88
        // is not used in its place.
        let mut future = items.clone();
        future.push(sbp(70.0, "mm[Hg]", "2024-05-01T12:20:00Z"));
        let m = map_features(&features(), &resources(future), &context(true));
        assert_eq!(
            m.features[1].value,
            Err(Missing::Unusable(UnusableReason::FutureTime))
        );
        items.push(sbp(3.0, "[psi]", "2024-05-01T11:30:00Z"));
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(
            m.features[1].value,
            Err(Missing::Unusable(UnusableReason::Unit("[psi]".into())))
        );
    }

    #[test]
    fn ambiguous_patient_data_is_missing() {
        let items = vec![
            json!({"resourceType": "Patient", "id": "p1", "birthDate": "1950", "gender": "other"}),
            json!({"resourceType": "Encounter", "id": "e1", "status": "in-progress", "class": {"code": "EMER"}}),
            json!({"resourceType": "Encounter", "id": "e2", "status": "in-progress", "class": {"code": "IMP"}}),
        ];
        let r = resources(items);
        let m = map_features(&features(), &r, &context(true));
        assert_eq!(m.features[0].value, Err(Missing::BirthDate));
        assert!(matches!(
            m.features[2].value,
            Err(Missing::NoPatientData(_))
        ));
        assert!(matches!(m.features[4].value, Err(Missing::Encounter(_))));
        let cx = MappingContext {
            encounter_id: Some("e2"),
            ..context(true)
        };
        assert_eq!(
            map_features(&features(), &r, &cx).features[4].value,
            Ok(0.0)
        );
    }

    /// The context of a hook naming `encounter_id`, the Conditions read.
    fn encounter_context(encounter_id: Option<&'static str>) -> MappingContext<'static> {
        MappingContext {
            encounter_id,
            ..context(true)
        }
    }

    /// A mapped feature's value, by name.
    fn value_of(m: &Mapped, name: &str) -> Result<f64, Missing> {
        m.features
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("no feature {name}"))
            .value
            .clone()
    }

    fn searchset(resources: Vec<Value>, total: Option<u64>, next: bool) -> Resources {
        let entry: Vec<Value> = resources
            .into_iter()
            .map(|r| json!({"search": {"mode": "match"}, "resource": r}))
            .collect();
        let mut b = json!({"resourceType": "Bundle", "type": "searchset", "entry": entry});
        if let Some(t) = total {
            b["total"] = json!(t);
        }
        if next {
            b["link"] = json!([{"relation": "next", "url": "https://ehr.example/fhir?page=2"}]);
        }
        Resources::from(Resource::from_value(&b, &Limits::default()).unwrap())
    }

    fn encounter(id: &str, status: &str, class: &str) -> Value {
        json!({"resourceType": "Encounter", "id": id, "status": status,
            "class": {"system": ACT_CODE, "code": class},
            "subject": {"reference": "Patient/p1"}})
    }

    /// Active Conditions of p1 that are not an infection (essential hypertension).
    fn other_conditions(n: usize) -> Vec<Value> {
        (0..n)
            .map(|i| {
                json!({"resourceType": "Condition", "id": format!("c{i}"),
                    "subject": {"reference": "Patient/p1"},
                    "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "59621000"}]}})
            })
            .collect()
    }

    #[test]
    fn no_infection_only_from_every_condition_not_one_page() {
        // 20 of 25 Conditions, a next page: an infection may be among the other 5. Even a
        // caller that says the Conditions were read gets "missing", never "no".
        let r = searchset(other_conditions(20), Some(25), true);
        let m = map_features(&features(), &r, &encounter_context(None));
        assert_eq!(value_of(&m, "infection"), Err(Missing::NoConditions));
        // The whole result: no infection is a 0.
        let r = searchset(other_conditions(20), Some(20), false);
        let m = map_features(&features(), &r, &encounter_context(None));
        assert_eq!(value_of(&m, "infection"), Ok(0.0));
        let infection = m.features.iter().find(|f| f.name == "infection").unwrap();
        assert_eq!(infection.shown.as_deref(), Some("no"));
        // An infection on the page is a 1, whether or not the rest was read.
        let mut items = other_conditions(19);
        let mut sepsis = other_conditions(1).remove(0);
        sepsis["code"]["coding"][0]["code"] = json!("91302008");
        items.push(sepsis);
        let r = searchset(items, Some(25), true);
        assert_eq!(
            value_of(
                &map_features(&features(), &r, &encounter_context(None)),
                "infection"
            ),
            Ok(1.0)
        );
    }

    #[test]
    fn an_encounter_in_error_or_cancelled_is_not_the_admission() {
        let value = |status: &str| {
            let r = searchset(vec![encounter("e1", status, "EMER")], None, false);
            value_of(
                &map_features(&features(), &r, &encounter_context(Some("e1"))),
                "emergency",
            )
        };
        // Recorded by mistake, or never took place: as if absent (no current encounter),
        // never "came in as an emergency".
        for status in ["entered-in-error", "cancelled"] {
            assert_eq!(
                value(status),
                Err(Missing::Encounter("no current encounter")),
                "{status}"
            );
        }
        // The admission being assessed, in progress or finished: its class counts.
        for status in ["in-progress", "finished", "arrived", "onleave"] {
            assert_eq!(value(status), Ok(1.0), "{status}");
        }
    }

    /// Red-team finding: an encounter in context that the search did not return (the EHR's
    /// example sends `encounterId` 89284) was "no current encounter"; and without one, an
    /// emergency patient `triaged` or `arrived` had no current encounter either.
    #[test]
    fn an_encounter_in_context_not_read_is_missing_and_triaged_is_under_way() {
        let r = searchset(
            vec![encounter("e-icu", "in-progress", "IMP")],
            Some(1),
            false,
        );
        let v = value_of(
            &map_features(&features(), &r, &encounter_context(Some("89284"))),
            "emergency",
        );
        assert!(
            matches!(&v, Err(Missing::Encounter(why)) if why.contains("was not among")),
            "{v:?}"
        );
        for status in ["triaged", "arrived"] {
            let r = searchset(vec![encounter("ed-1", status, "EMER")], Some(1), false);
            let v = value_of(
                &map_features(&features(), &r, &encounter_context(None)),
                "emergency",
            );
            assert_eq!(v, Ok(1.0), "{status}");
        }
    }

    #[test]
    fn the_only_in_progress_encounter_needs_every_encounter() {
        // One in-progress Encounter on a page of a longer search: another may follow.
        let r = searchset(vec![encounter("e1", "in-progress", "EMER")], Some(2), true);
        assert!(matches!(
            value_of(
                &map_features(&features(), &r, &encounter_context(None)),
                "emergency"
            ),
            Err(Missing::Encounter(_))
        ));
        // Named by the hook's encounterId, the page is enough.
        assert_eq!(
            value_of(
                &map_features(&features(), &r, &encounter_context(Some("e1"))),
                "emergency"
            ),
            Ok(1.0)
        );
        let r = searchset(vec![encounter("e1", "in-progress", "EMER")], Some(1), false);
        assert_eq!(
            value_of(
                &map_features(&features(), &r, &encounter_context(None)),
                "emergency"
            ),
            Ok(1.0)
        );
        // A class that is none of v3's encounter classes is missing, not "not emergency"
        // (`emer` was read as 0: a red-team finding); another class is a 0.
        for (class, want) in [("emer", None), ("<b>", None), ("IMP", Some(0.0))] {
            let r = searchset(vec![encounter("e1", "in-progress", class)], Some(1), false);
            let got = value_of(
                &map_features(&features(), &r, &encounter_context(None)),
                "emergency",
            );
            assert_eq!(got.ok(), want, "{class}");
        }
    }

    /// Red-team findings: a Condition whose clinical status cannot be read (none, no
    /// system, STU3's system, text only) was read as inactive, and the feature scored "no".
    #[test]
    fn a_condition_of_unreadable_status_is_neither_yes_nor_no() {
        let with_status = |status: Value| {
            let mut items = base();
            items[1]["clinicalStatus"] = status;
            map_features(&features(), &resources(items), &context(true))
        };
        for status in [
            json!({"coding": [{"code": "active"}]}),
            json!({"coding": [{"system": "http://hl7.org/fhir/condition-clinical", "code": "active"}]}),
        ] {
            assert_eq!(value_of(&with_status(status), "infection"), Ok(1.0));
        }
        for status in [
            json!({"text": "active"}),
            json!({"coding": [{"system": "http://example.org/local", "code": "A"}]}),
            json!({"coding": [{"code": "active"}, {"code": "resolved"}]}),
            Value::Null,
        ] {
            assert_eq!(
                value_of(&with_status(status), "infection"),
                Err(Missing::ConditionStatusUnknown)
            );
        }
        // Abated without a status (R4 con-4): inactive; resolved, or refuted: no.
        let mut items = base();
        items[1].as_object_mut().unwrap().remove("clinicalStatus");
        items[1]["abatementDateTime"] = json!("2023-01-01");
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(value_of(&m, "infection"), Ok(0.0));
        // ... but one that ends after now (or whose end is an age, a range or a text) has not
        // surely ended: neither yes nor no (a sepsis with no status and an abatement three
        // days ahead was read as over, 35 % where it is 43 %: a red-team finding).
        for abatement in [
            json!({"abatementDateTime": "2024-05-04"}),
            json!({"abatementPeriod": {"start": "2024-04-01", "end": "2024-05-04"}}),
            json!({"abatementString": "resolving"}),
            json!({"abatementAge": {"value": 80, "unit": "a"}}),
        ] {
            let mut items = base();
            items[1].as_object_mut().unwrap().remove("clinicalStatus");
            items[1]
                .as_object_mut()
                .unwrap()
                .extend(abatement.as_object().unwrap().clone());
            let m = map_features(&features(), &resources(items), &context(true));
            assert_eq!(
                value_of(&m, "infection"),
                Err(Missing::ConditionStatusUnknown),
                "{abatement}"
            );
        }
        let mut items = base();
        items[1].as_object_mut().unwrap().remove("clinicalStatus");
        items[1]["abatementPeriod"] = json!({"start": "2024-04-01", "end": "2024-04-20"});
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(value_of(&m, "infection"), Ok(0.0));
        let m = with_status(json!({"coding": [{"code": "resolved"}]}));
        assert_eq!(value_of(&m, "infection"), Ok(0.0));
        let mut items = base();
        items[1]["verificationStatus"] = json!({"coding": [{"code": "refuted"}]});
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(value_of(&m, "infection"), Ok(0.0));
    }

    /// Red-team findings: copies of one Condition that disagree without versions scored
    /// "yes"; a third copy, retracted, replaced only the first of two.
    #[test]
    fn copies_of_a_condition_that_disagree_leave_it_unknown() {
        let mut active = base()[1].clone();
        active["id"] = json!("c1");
        let mut refuted = active.clone();
        refuted["verificationStatus"] = json!({"coding": [{"code": "refuted"}]});
        let mut resolved = active.clone();
        resolved["clinicalStatus"] = json!({"coding": [{"code": "resolved"}]});
        for other in [&refuted, &resolved] {
            for pair in [
                vec![active.clone(), other.clone()],
                vec![other.clone(), active.clone()],
            ] {
                let mut items = base();
                items.remove(1);
                items.extend(pair);
                let m = map_features(&features(), &resources(items), &context(true));
                assert_eq!(
                    value_of(&m, "infection"),
                    Err(Missing::ConditionStatusUnknown)
                );
            }
        }
        // With versions, the newer decides.
        let mut v1 = active.clone();
        v1["meta"] = json!({"versionId": "1"});
        let mut v2 = resolved.clone();
        v2["meta"] = json!({"versionId": "2"});
        let mut items = base();
        items.remove(1);
        items.extend([v2, v1]);
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(value_of(&m, "infection"), Ok(0.0));
    }

    #[test]
    fn a_retracted_copy_replaces_every_copy_kept_before_it() {
        let at = |v: f64| {
            let mut o = sbp(v, "mm[Hg]", "2024-05-01T11:30:00Z");
            o["id"] = json!("bp");
            o
        };
        let mut retracted = at(90.0);
        retracted["status"] = json!("entered-in-error");
        let mut items = base();
        items.extend([
            sbp(120.0, "mm[Hg]", "2024-05-01T10:00:00Z"),
            at(88.0),
            at(90.0),
            retracted,
        ]);
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(value_of(&m, "systolic_bp"), Ok(120.0));
    }

    /// Red-team finding: two systolic components of one panel scored by their order.
    #[test]
    fn a_panel_with_two_differing_systolic_components_is_conflicting() {
        let panel = |a: f64, b: f64| {
            json!({"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
                "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2024-05-01T11:00:00Z",
                "component": [
                    {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                     "valueQuantity": {"value": a, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}},
                    {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                     "valueQuantity": {"value": b, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}]})
        };
        for (a, b) in [(120.0, 70.0), (70.0, 120.0)] {
            let mut items = base();
            items.push(panel(a, b));
            let m = map_features(&features(), &resources(items), &context(true));
            assert_eq!(
                value_of(&m, "systolic_bp"),
                Err(Missing::Unusable(UnusableReason::Conflicting))
            );
        }
        let mut items = base();
        items.push(panel(120.0, 120.0));
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(value_of(&m, "systolic_bp"), Ok(120.0));
    }

    /// Red-team finding: of two values of one time, the one with an `issued` won over one
    /// without, whichever it was.
    #[test]
    fn of_one_time_an_issue_time_on_one_value_only_corrects_nothing() {
        let t = "2024-05-01T11:00:00Z";
        for (a, b) in [(120.0, 60.0), (60.0, 120.0)] {
            let mut issued = sbp(a, "mm[Hg]", t);
            issued["issued"] = json!("2024-05-01T11:30:00Z");
            for pair in [
                vec![issued.clone(), sbp(b, "mm[Hg]", t)],
                vec![sbp(b, "mm[Hg]", t), issued.clone()],
            ] {
                let mut items = base();
                items.extend(pair);
                let m = map_features(&features(), &resources(items), &context(true));
                assert_eq!(
                    value_of(&m, "systolic_bp"),
                    Err(Missing::Unusable(UnusableReason::Conflicting))
                );
            }
        }
    }

    /// Red-team finding: a resource retracted (`entered-in-error`) in a later copy of the
    /// same id was still scored from its first copy.
    #[test]
    fn the_newest_version_of_a_resource_is_the_one_read() {
        let mut old = sbp(60.0, "mm[Hg]", "2024-05-01T11:00:00Z");
        old["id"] = json!("o1");
        old["meta"] = json!({"versionId": "1"});
        let mut retracted = old.clone();
        retracted["status"] = json!("entered-in-error");
        retracted["meta"] = json!({"versionId": "2"});
        let mut earlier = sbp(120.0, "mm[Hg]", "2024-05-01T10:00:00Z");
        earlier["id"] = json!("o0");
        for pair in [
            vec![old.clone(), retracted.clone()],
            vec![retracted.clone(), old.clone()],
        ] {
            let mut items = base();
            items.push(earlier.clone());
            items.extend(pair);
            let m = map_features(&features(), &resources(items), &context(true));
            assert_eq!(value_of(&m, "systolic_bp"), Ok(120.0));
        }
        // Without versions, a copy that says it was made in error still wins.
        let mut plain = old.clone();
        plain.as_object_mut().unwrap().remove("meta");
        let mut retracted_plain = retracted.clone();
        retracted_plain.as_object_mut().unwrap().remove("meta");
        let mut items = base();
        items.push(earlier.clone());
        items.extend([retracted_plain, plain]);
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(value_of(&m, "systolic_bp"), Ok(120.0));
        // A newer version by lastUpdated replaces the older.
        let mut v1 = sbp(60.0, "mm[Hg]", "2024-05-01T11:00:00Z");
        v1["id"] = json!("o2");
        v1["meta"] = json!({"lastUpdated": "2024-05-01T11:01:00Z"});
        let mut v2 = v1.clone();
        v2["valueQuantity"]["value"] = json!(110.0);
        v2["status"] = json!("corrected");
        v2["meta"] = json!({"lastUpdated": "2024-05-01T11:40:00Z"});
        let mut items = base();
        items.extend([v2, v1]);
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(value_of(&m, "systolic_bp"), Ok(110.0));
    }

    /// Red-team findings: an Observation of another FHIR server's `Patient/p1`, or with no
    /// subject, was taken as this patient's.
    #[test]
    fn only_this_servers_patient_is_this_patient() {
        let at_on = |server: Option<&str>, subject: Option<&str>| {
            let mut o = sbp(60.0, "mm[Hg]", "2024-05-01T11:30:00Z");
            match subject {
                Some(s) => o["subject"] = json!({"reference": s}),
                None => {
                    o.as_object_mut().unwrap().remove("subject");
                }
            }
            let mut r = Resources::of_server(server);
            for v in base()
                .into_iter()
                .chain([sbp(120.0, "mm[Hg]", "2024-05-01T11:00:00Z"), o])
            {
                r.add(Resource::from_value(&v, &Limits::default()).unwrap());
            }
            value_of(
                &map_features(&features(), &r, &context(true)),
                "systolic_bp",
            )
        };
        let at = |subject: Option<&str>| at_on(Some("https://ehr.example/fhir/"), subject);
        assert_eq!(at(Some("https://other.example/fhir/Patient/p1")), Ok(120.0));
        assert_eq!(at(None), Ok(120.0));
        assert_eq!(at(Some("https://ehr.example/fhir/Patient/p1")), Ok(60.0));
        assert_eq!(
            at(Some("https://ehr.example/fhir/Patient/p1/_history/3")),
            Ok(60.0)
        );
        assert_eq!(at(Some("Patient/p1")), Ok(60.0));
        // The same server written another way (host case, default port, scheme case): its
        // (a later red-team finding: the newest value was set aside, an older one scored).
        for same in [
            "https://EHR.example/fhir/Patient/p1",
            "https://ehr.example:443/fhir/Patient/p1",
            "HTTPS://ehr.example/fhir/Patient/p1",
        ] {
            assert_eq!(at(Some(same)), Ok(60.0), "{same}");
        }
        // Below the server's path but not a Patient of it (another tenant, a Group's
        // member path, dot segments), another port or scheme: not this patient's.
        for other in [
            "https://ehr.example/fhir/TENANT_B/Patient/p1",
            "https://ehr.example/fhir/Group/g/Patient/p1",
            "https://ehr.example/fhir/Observation/x/../../Patient/p1",
            "https://ehr.example:8443/fhir/Patient/p1",
            "http://ehr.example/fhir/Patient/p1",
            "https://ehr.example/fhirx/Patient/p1",
            "https://user@ehr.example/fhir/Patient/p1",
            "Group/g/Patient/p1",
            "Patient/",
        ] {
            assert_eq!(at(Some(other)), Ok(120.0), "{other}");
        }
        // A call that names no FHIR server has no server of its own: an absolute URL names
        // a patient of some other server, not this one (a later red-team finding: another
        // trust's `Patient/p1` was scored as this patient's when the call had no server).
        for other in [
            "https://other-trust.example/fhir/Patient/p1",
            "http://other-hospital.example/fhir/Group/g/Patient/p1",
            "https://ehr.example/fhir/Patient/p1/_history/3",
        ] {
            assert_eq!(at_on(None, Some(other)), Ok(120.0), "{other}");
        }
        assert_eq!(at_on(None, Some("Patient/p1")), Ok(60.0));
        assert_eq!(at_on(None, Some("Patient/p1/_history/2")), Ok(60.0));
    }

    /// Red-team finding: a value with two `effective[x]` (invalid R4) used the first.
    #[test]
    fn two_effective_times_make_a_value_unusable() {
        let mut o = sbp(60.0, "mm[Hg]", "2024-05-01T11:30:00Z");
        o["effectivePeriod"] = json!({"start": "2024-05-01T09:00:00Z"});
        let mut items = base();
        items.extend([sbp(120.0, "mm[Hg]", "2024-05-01T11:00:00Z"), o]);
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(
            value_of(&m, "systolic_bp"),
            Err(Missing::Unusable(UnusableReason::Time(
                DateError::SeveralTimes
            )))
        );
    }

    /// Red-team finding: an active Condition that cannot be classified (no code, text only,
    /// codes only in another system than the feature lists) was read as "not that
    /// condition", and the feature as "no".
    #[test]
    fn a_condition_that_cannot_be_classified_is_not_a_no() {
        let with_code = |code: Option<Value>, status: &str| {
            let mut items = base();
            items.remove(1);
            let mut c = json!({"resourceType": "Condition", "id": "c9",
                "subject": {"reference": "Patient/p1"},
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": status}]}});
            if let Some(code) = code {
                c["code"] = code;
            }
            items.push(c);
            map_features(&features(), &resources(items), &context(true))
        };
        let unclassified = Err(Missing::ConditionUnclassified(crate::fhir::SNOMED.into()));
        for code in [
            None,
            Some(json!({"text": "Sepsis"})),
            Some(
                json!({"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "A41.9"}]}),
            ),
            Some(json!({"coding": [{"system": crate::fhir::SNOMED}]})),
            Some(json!({"coding": [{"code": "91302008"}]})),
        ] {
            let m = with_code(code.clone(), "active");
            assert_eq!(value_of(&m, "infection"), unclassified, "{code:?}");
            let why = m.missing().join("; ");
            assert!(
                why.contains("could not be classified (no code in http://snomed.info/sct)"),
                "{why}"
            );
            // Resolved, it does not matter what it was.
            let m = with_code(code.clone(), "resolved");
            assert_eq!(value_of(&m, "infection"), Ok(0.0), "{code:?}");
        }
        // Coded in the listed system with another code: not that condition (codes are
        // matched exactly, without subsumption: a documented limit).
        let other = json!({"coding": [{"system": crate::fhir::SNOMED, "code": "59621000"}]});
        assert_eq!(
            value_of(&with_code(Some(other), "active"), "infection"),
            Ok(0.0)
        );
        // ... also when its SNOMED CT code is given beside an ICD-10 one.
        let both = json!({"coding": [
            {"system": "http://hl7.org/fhir/sid/icd-10", "code": "I10"},
            {"system": crate::fhir::SNOMED, "code": "59621000"}]});
        assert_eq!(
            value_of(&with_code(Some(both), "active"), "infection"),
            Ok(0.0)
        );
        // SNOMED CT's OID is SNOMED CT: the listed code found, and another code a "no".
        let oid = |code: &str| json!({"coding": [{"system": "urn:oid:2.16.840.1.113883.6.96", "code": code}]});
        assert_eq!(
            value_of(&with_code(Some(oid("91302008")), "active"), "infection"),
            Ok(1.0)
        );
        assert_eq!(
            value_of(&with_code(Some(oid("59621000")), "active"), "infection"),
            Ok(0.0)
        );
        // An infection recorded beside an unclassifiable Condition is a "yes".
        let mut items = base();
        items.push(
            json!({"resourceType": "Condition", "subject": {"reference": "Patient/p1"},
            "clinicalStatus": {"coding": [{"code": "active"}]}, "code": {"text": "?"}}),
        );
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(value_of(&m, "infection"), Ok(1.0));
        // Its clinical status unreadable too: it may hold, and it may be one of them.
        let mut items = base();
        items.remove(1);
        items.push(
            json!({"resourceType": "Condition", "subject": {"reference": "Patient/p1"},
            "code": {"text": "chest infection"}}),
        );
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(value_of(&m, "infection"), unclassified);
        // Another patient's: not this patient's conditions.
        let mut items = base();
        items.remove(1);
        items.push(
            json!({"resourceType": "Condition", "subject": {"reference": "Patient/p2"},
            "clinicalStatus": {"coding": [{"code": "active"}]}, "code": {"text": "sepsis"}}),
        );
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(value_of(&m, "infection"), Ok(0.0));
    }

    /// LOINC's OID is LOINC: a systolic pressure coded `urn:oid:2.16.840.1.113883.6.1` is the
    /// newest value, not passed over for an older one.
    #[test]
    fn an_observation_coded_with_the_loinc_oid_is_read() {
        let mut newer = sbp(80.0, "mm[Hg]", "2024-05-01T11:55:00Z");
        newer["code"]["coding"][0]["system"] = json!("urn:oid:2.16.840.1.113883.6.1");
        let mut items = base();
        items.push(sbp(140.0, "mm[Hg]", "2024-05-01T02:00:00Z"));
        items.push(newer);
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(value_of(&m, "systolic_bp"), Ok(80.0));
    }

    /// Red-team finding: an Observation of the feature's code that could not be read (a value
    /// written as a string, a status outside FHIR's codes), the only one of its code, was
    /// "no recent result".
    #[test]
    fn an_only_observation_that_could_not_be_read_is_named() {
        let mut as_string = sbp(95.0, "mm[Hg]", "2024-05-01T11:00:00Z");
        as_string["valueQuantity"]["value"] = json!("95");
        let mut bogus = sbp(95.0, "mm[Hg]", "2024-05-01T11:00:00Z");
        bogus["status"] = json!("bogus");
        let mut undated = as_string.clone();
        undated.as_object_mut().unwrap().remove("effectiveDateTime");
        for bad in [as_string.clone(), bogus, undated] {
            let bundle = json!({"resourceType": "Bundle", "type": "collection",
                "entry": [{"resource": bad}]});
            let mut r = resources(base());
            r.add(Resource::from_value(&bundle, &Limits::default()).unwrap());
            assert_eq!(r.unreadable.len(), 1);
            let m = map_features(&features(), &r, &context(true));
            assert_eq!(
                value_of(&m, "systolic_bp"),
                Err(Missing::Unusable(UnusableReason::UnreadableObservation))
            );
            assert!(
                m.missing().join("; ").contains("could not be read"),
                "{:?}",
                m.missing()
            );
        }
        // One of another code, or older than the look-back window: no recent result.
        let mut other = as_string.clone();
        other["code"]["coding"][0]["code"] = json!("8867-4");
        let mut old = as_string;
        old["effectiveDateTime"] = json!("2024-04-30T10:00:00Z");
        for quiet in [other, old] {
            let bundle = json!({"resourceType": "Bundle", "type": "collection",
                "entry": [{"resource": quiet}]});
            let mut r = resources(base());
            r.add(Resource::from_value(&bundle, &Limits::default()).unwrap());
            let m = map_features(&features(), &r, &context(true));
            assert_eq!(value_of(&m, "systolic_bp"), Err(Missing::NoObservation));
        }
    }

    /// Red-team finding: an Encounter with an R5-style `class` list could not be read, and
    /// the card blamed "one page of a longer search".
    #[test]
    fn an_encounter_that_could_not_be_read_is_named_as_such() {
        let r5 = json!({"resourceType": "Encounter", "id": "e1", "status": "in-progress",
            "class": [{"coding": [{"system": ACT_CODE, "code": "EMER"}]}],
            "subject": {"reference": "Patient/p1"}});
        let bundle =
            json!({"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r5}]});
        let mut r = resources(vec![base()[0].clone(), base()[1].clone()]);
        r.add(Resource::from_value(&bundle, &Limits::default()).unwrap());
        for encounter_id in [None, Some("e1")] {
            let value = value_of(
                &map_features(&features(), &r, &encounter_context(encounter_id)),
                "emergency",
            );
            let Err(Missing::Encounter(why)) = &value else {
                panic!("{value:?}");
            };
            assert!(why.contains("an Encounter could not be read"), "{why}");
            assert!(!why.contains("page"), "{why}");
        }
    }

    /// Red-team finding: 1e308 mm[Hg] was shown as "inf mm[Hg]" (scaled by 100 to round, it
    /// overflowed).
    #[test]
    fn a_huge_value_is_shown_as_it_is() {
        assert_eq!(number(1e308), "1e308");
        assert_eq!(number(-2.5e20), "-2.5e20");
        assert_eq!(number(88.0), "88");
        assert_eq!(number(90.007_404), "90.01");
        assert_eq!(number(-0.001), "0");
        let mut specs = features();
        specs[1].max = Some(212.0);
        let mut items = base();
        items.push(sbp(1e308, "mm[Hg]", "2024-05-01T11:00:00Z"));
        let m = map_features(&specs, &resources(items), &context(true));
        assert_eq!(
            value_of(&m, "systolic_bp"),
            Err(Missing::OutOfRange {
                value: "1e308 mm[Hg]".into(),
                range: "at most 212 mm[Hg]".into()
            })
        );
    }

    /// Red-team finding: two differing records of the patient were called "no Patient".
    #[test]
    fn differing_patient_records_are_named_as_such() {
        let mut items = base();
        items.push(json!({"resourceType": "Patient", "id": "p1", "birthDate": "1950-06", "gender": "female"}));
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(
            value_of(&m, "age"),
            Err(Missing::NoPatientData(
                "the EHR sent differing records of this Patient"
            ))
        );
        // With versions, the newer is the record.
        let mut items = base();
        items[0]["meta"] = json!({"versionId": "7"});
        items.push(
            json!({"resourceType": "Patient", "id": "p1", "meta": {"versionId": "6"},
            "birthDate": "1950-06", "gender": "female"}),
        );
        let m = map_features(&features(), &resources(items), &context(true));
        assert_eq!(value_of(&m, "age"), Ok(73.0));
    }
}
