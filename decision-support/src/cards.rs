//! Cards for a NEWS2 [`Assessment`]: the score, what is missing, or why it does not apply.
//!
//! - a score: the indicator follows the clinical risk (low → info; low–medium and medium
//!   → warning; high → critical), the summary reads "NEWS2 7 — high clinical risk", the
//!   detail is a markdown table of each parameter's value, unit, time and sub-score, then
//!   the response the chart recommends;
//! - missing or unusable data: an info card listing what is missing (never a partial
//!   score);
//! - not applicable (under 16, pregnancy): an info card saying so.
//!
//! The source of every NEWS2 card cites RCP NEWS2 (2017) ([`Wording::source_label`],
//! [`Wording::source_url`]).
//!
//! Risk-model cards ([`risk_card`], [`risk_missing_card`]) show a model's risk against its
//! operating threshold, the model and version, the top contributing factors, the intended
//! use and the caveat; or, when inputs are missing, which ones (never imputed).

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::hooks::{Card, Indicator, Source};
use crate::news2::{
    Assessment, ClinicalRisk, ConditionsRead, Incomplete, NotApplicable, Scored, SpO2Scale,
};
use crate::vitals::Parameter;

/// The words of NEWS2 cards (configurable per service).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Wording {
    /// The card source's label.
    pub source_label: String,
    /// The card source's URL.
    pub source_url: String,
    /// A line added at the end of every card's detail (e.g. local escalation policy).
    pub footer: Option<String>,
}

/// The RCP's NEWS2 page.
pub const RCP_NEWS2_URL: &str =
    "https://www.rcp.ac.uk/improving-care/resources/national-early-warning-score-news-2/";

impl Default for Wording {
    fn default() -> Self {
        Wording {
            source_label: "Royal College of Physicians NEWS2 (2017)".to_owned(),
            source_url: RCP_NEWS2_URL.to_owned(),
            footer: None,
        }
    }
}

impl Wording {
    fn source(&self) -> Source {
        Source {
            label: self.source_label.clone(),
            url: Some(self.source_url.clone()),
            icon: None,
            topic: None,
        }
    }

    fn finish(&self, mut detail: String) -> String {
        if let Some(f) = &self.footer {
            detail.push_str("\n\n");
            detail.push_str(f);
        }
        detail
    }
}

/// The indicator of a clinical risk band.
pub fn indicator(risk: ClinicalRisk) -> Indicator {
    match risk {
        ClinicalRisk::Low => Indicator::Info,
        ClinicalRisk::LowMedium | ClinicalRisk::Medium => Indicator::Warning,
        ClinicalRisk::High => Indicator::Critical,
    }
}

/// The card of an assessment.
pub fn news2_card(assessment: &Assessment, wording: &Wording) -> Card {
    match assessment {
        Assessment::Scored(s) => scored_card(s, wording),
        Assessment::Incomplete(i) => incomplete_card(i, wording),
        Assessment::NotApplicable(n) => not_applicable_card(*n, wording),
    }
}

/// Markdown-escapes text that may come from input (a unit name): punctuation Markdown reads
/// (`:` too, so no bare URL becomes a link), and without control or bidirectional format
/// characters ([`plain`]).
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in plain(text).chars() {
        if "\\`*_{}[]()<>#+-.!|~:".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Text from input for a plain-text field (a card's summary): without control characters
/// (a NUL, line breaks) nor the bidirectional format characters that reorder what a
/// clinician reads (U+202E RIGHT-TO-LEFT OVERRIDE reached a summary: a red-team finding).
fn plain(text: &str) -> String {
    text.chars()
        .filter(|c| {
            !c.is_control()
                && !matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
        })
        .collect()
}

fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

fn number(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    if decimals > 0 {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

fn scored_card(s: &Scored, wording: &Wording) -> Card {
    let score = &s.score;
    let v = &s.vitals;
    let mut rows = String::from("| Parameter | Value | Time | Score |\n|---|---|---|---:|\n");
    for (p, sub) in score.sub_scores {
        let value = match p {
            Parameter::RespirationRate => v
                .respiration_rate
                .as_ref()
                .map(|r| (number(r.value, 1), r.converted_from.clone())),
            Parameter::OxygenSaturation => v
                .oxygen_saturation
                .as_ref()
                .map(|r| (number(r.value, 1), r.converted_from.clone())),
            Parameter::AirOrOxygen => v
                .air_or_oxygen
                .as_ref()
                .map(|r| (r.value.name().to_owned(), None)),
            Parameter::SystolicBloodPressure => v
                .systolic_blood_pressure
                .as_ref()
                .map(|r| (number(r.value, 1), r.converted_from.clone())),
            Parameter::PulseRate => v
                .pulse_rate
                .as_ref()
                .map(|r| (number(r.value, 1), r.converted_from.clone())),
            Parameter::Consciousness => v
                .consciousness
                .as_ref()
                .map(|r| (r.value.name().to_owned(), None)),
            Parameter::Temperature => v
                .temperature
                .as_ref()
                .map(|r| (number(r.value, 2), r.converted_from.clone())),
        };
        let (value, from) = value.unwrap_or_default();
        let unit = p.display_unit();
        let mut cell = if unit.is_empty() {
            value
        } else {
            format!("{value} {unit}")
        };
        if let Some(from) = from {
            cell.push_str(&format!(" (converted from {})", escape(&from)));
        }
        let when = v.time(p).map(time).unwrap_or_default();
        let name = match (p, score.scale) {
            (Parameter::OxygenSaturation, SpO2Scale::Scale2) => "SpO2 (scale 2)",
            (Parameter::OxygenSaturation, SpO2Scale::Scale1) => "SpO2 (scale 1)",
            _ => p.name(),
        };
        rows.push_str(&format!("| {name} | {cell} | {when} | {sub} |\n"));
    }
    rows.push_str(&format!("| **Total** | | | **{}** |\n", score.total));
    let response = score.response();
    let mut detail = rows;
    detail.push_str(&format!(
        "\n**Clinical risk: {}** ({}): {}.\n\n**Monitoring:** {}.\n\n**Clinical response** (RCP NEWS2 Chart 4, {}):\n",
        score.risk.name(),
        response.trigger,
        score.risk.response(),
        response.monitoring,
        response.trigger,
    ));
    for a in response.actions {
        detail.push_str(&format!("- {a}\n"));
    }
    if score.has_red_score() && score.risk != ClinicalRisk::LowMedium {
        detail.push_str("\nA single parameter scores 3 (a red score).\n");
    }
    detail.push_str(&not_final_note(&v.newer_not_final));
    match s.conditions {
        ConditionsRead::All => {}
        ConditionsRead::OnePage => detail.push_str(
            "\nThe patient's conditions were only partly available (one page of a longer \
             search, or an entry that could not be read): pregnancy (in which NEWS2 is not \
             validated) and a prescribed SpO2 target of 88–92 % (scale 2) could not be \
             checked against all of them.\n",
        ),
        ConditionsRead::None => detail.push_str(
            "\nThe patient's conditions were not available (not prefetched, and not read \
             from the FHIR server): pregnancy (in which NEWS2 is not validated) and a \
             prescribed SpO2 target of 88–92 % (scale 2) could not be checked.\n",
        ),
    }
    if s.pregnancy_status_unread {
        detail.push_str(
            "\nThe patient's pregnancy status could not be read from the EHR's FHIR server: \
             NEWS2 is not validated in pregnancy, and pregnancy was checked against the \
             conditions only.\n",
        );
    }
    let summary = format!(
        "NEWS2 {} — {} clinical risk{}{}",
        score.total,
        score.risk.name(),
        if score.scale == SpO2Scale::Scale2 {
            " (SpO2 scale 2)"
        } else {
            ""
        },
        if v.newer_not_final.is_empty() {
            ""
        } else {
            "; newer readings not yet final were not scored"
        }
    );
    Card::builder(&summary, indicator(score.risk), wording.source())
        .detail(wording.finish(detail))
        .build()
}

fn incomplete_card(i: &Incomplete, wording: &Wording) -> Card {
    let mut items: Vec<String> = vec![];
    if let Some(age) = i.age {
        items.push(format!("Age: {age}"));
    }
    for p in &i.missing {
        if i.future_dated.contains(p) {
            items.push(format!(
                "{}: no value in the look-back window; a value dated in the future was not \
                 used (check the device or charting clock)",
                p.name()
            ));
        } else {
            items.push(format!(
                "{}: no value recorded in the look-back window",
                p.name()
            ));
        }
    }
    for u in &i.unusable {
        let when = u
            .time
            .map(|t| format!(" ({})", time(t)))
            .unwrap_or_default();
        items.push(format!(
            "{}: latest value cannot be used{when}: {}",
            u.parameter.name(),
            escape(&u.reason.to_string())
        ));
    }
    let mut names: Vec<&str> = i.missing.iter().map(|p| p.name()).collect();
    names.extend(i.unusable.iter().map(|u| u.parameter.name()));
    if i.age.is_some() {
        names.insert(0, "age");
    }
    let summary = format!("NEWS2 not calculated: missing {}", names.join(", "));
    let mut detail = String::from(
        "NEWS2 needs all seven parameters; no partial score is given. Missing or unusable:\n\n",
    );
    for item in items {
        detail.push_str(&format!("- {item}\n"));
    }
    detail.push_str(&not_final_note(&i.newer_not_final));
    Card::builder(&summary, Indicator::Info, wording.source())
        .detail(wording.finish(detail))
        .build()
}

/// The card's words for readings newer than those used that are not final yet (empty when
/// there are none): NEWS2 scores final results only, and a clinician must hear of a newer
/// preliminary value rather than read a reassuring score without it.
fn not_final_note(newer: &[(Parameter, Option<DateTime<Utc>>)]) -> String {
    let named: Vec<(String, Option<DateTime<Utc>>)> = newer
        .iter()
        .map(|(p, t)| (p.name().to_owned(), *t))
        .collect();
    newer_readings_note(&named, "scored", "NEWS2 here uses")
}

/// The words of [`not_final_note`] for readings named `name`, not `verb` by `who` ("NEWS2
/// here uses", "the model uses").
fn newer_readings_note(newer: &[(String, Option<DateTime<Utc>>)], verb: &str, who: &str) -> String {
    if newer.is_empty() {
        return String::new();
    }
    let mut note = format!(
        "\n**Newer readings not yet final were not {verb}** ({who} final results only; a \
         preliminary or registered reading, e.g. a device's before a nurse confirms it, is \
         left out). Check them in the chart:\n\n",
    );
    for (name, t) in newer {
        let name = escape(name);
        match t {
            Some(t) => note.push_str(&format!("- {name}: a reading at {}\n", time(*t))),
            None => note.push_str(&format!(
                "- {name}: a reading whose time cannot be read (it may be newer)\n"
            )),
        }
    }
    note
}

/// [`newer_readings_note`] for a risk model's inputs.
fn risk_not_final_note(newer: &[(String, Option<DateTime<Utc>>)]) -> String {
    newer_readings_note(newer, "used", "the model uses")
}

fn not_applicable_card(n: NotApplicable, wording: &Wording) -> Card {
    let (summary, detail) = match n {
        NotApplicable::UnderSixteen { .. } => (
            "NEWS2 not applicable: patient under 16",
            "NEWS2 is not validated for use in children under 16 years of age; use a paediatric early warning score.",
        ),
        NotApplicable::Pregnancy => (
            "NEWS2 not applicable: pregnancy",
            "NEWS2 is not validated in pregnancy; use an obstetric early warning score.",
        ),
        NotApplicable::Deceased => (
            "NEWS2 not calculated: the patient is recorded as deceased",
            "The Patient record in the EHR says the patient has died; no score is shown. If this is wrong, correct the Patient record.",
        ),
    };
    Card::builder(summary, Indicator::Info, wording.source())
        .detail(wording.finish(detail.to_owned()))
        .build()
}

/// One input's contribution to a risk model's output, in logit space against the bundle's
/// reference point (for a logistic model, wᵢ·(xᵢ − x̄ᵢ) on the model's own inputs).
#[derive(Clone, Debug, PartialEq)]
pub struct Contribution {
    /// The feature in plain words ("systolic bp").
    pub feature: String,
    /// The patient's value as shown (with its unit), if it is shown.
    pub value: Option<String>,
    /// The contribution to the logit (positive: raises the risk).
    pub logit: f64,
}

/// How the contributions were computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttributionMethod {
    /// Exact for a linear-logistic model: wᵢ·(zᵢ − z̄ᵢ) on the model's scaled inputs, read
    /// from the ONNX graph; they sum to logit(risk) − logit(reference).
    LinearExact,
    /// Model-agnostic: the change of the logit when one input at a time is replaced by its
    /// reference value (they need not sum to the total).
    OneAtATime,
    /// Model-agnostic Shapley values (KernelSHAP) of the game v(S) = mean over the bundle's
    /// background rows b of logit f(x_S, b_S̄): they sum to logit(risk) minus the mean logit
    /// of the background (the reference). `exact`: every coalition was evaluated (the exact
    /// Shapley values of that game), else `coalitions` were sampled (an estimate).
    KernelShap {
        background_rows: usize,
        coalitions: usize,
        exact: bool,
    },
}

/// What a risk-model card says.
#[derive(Clone, Debug, PartialEq)]
pub struct RiskCard {
    /// What is predicted ("ICU mortality").
    pub title: String,
    /// The model's name and version.
    pub model_name: String,
    pub model_version: String,
    /// The predicted probability, in [0, 1].
    pub risk: f64,
    /// The bundle's operating threshold, in (0, 1).
    pub threshold: f64,
    /// Every input's contribution; the card shows the `top` largest in magnitude.
    pub contributions: Vec<Contribution>,
    /// How many contributions the card shows in words.
    pub top: usize,
    /// The probability at the reference point (the training mean), when known.
    pub reference_risk: Option<f64>,
    /// How the contributions were computed.
    pub method: AttributionMethod,
    /// The bundle's intended use and population (e.g. "adult Pima women").
    pub intended_use: String,
    /// The bundle's caveat ("Not for clinical use without local validation").
    pub caveat: String,
    /// The card's source (the model card's label and URL).
    pub source: Source,
    /// Inputs (in plain words) with a reading newer than the one used that is not final
    /// yet, and its time when it can be read ([`crate::risk::Mapped::newer_not_final`]).
    pub newer_not_final: Vec<(String, Option<DateTime<Utc>>)>,
}

/// `p` as a percentage to `decimals` places (to none, a risk under 1 % reads "<1%").
fn percent_to(p: f64, decimals: usize) -> String {
    let v = p * 100.0;
    if decimals == 0 && v > 0.0 && v < 1.0 {
        "<1%".to_owned()
    } else {
        format!("{v:.decimals$}%")
    }
}

/// A risk and its threshold as percentages, to whole percents unless they would then read
/// the same while they differ: then to as many decimals as tell them apart (at most 6).
/// "risk 18% (below the 18% threshold)" for 0.181894 against 0.183632 read as a
/// contradiction (a red-team finding); it reads "18.19% (below the 18.36% threshold)".
/// Rounding keeps their order, so the shown values never contradict "below" or "at or
/// above".
fn percents(risk: f64, threshold: f64) -> (String, String) {
    let mut decimals = 0;
    loop {
        let (r, t) = (percent_to(risk, decimals), percent_to(threshold, decimals));
        if r != t || risk == threshold || decimals >= 6 {
            return (r, t);
        }
        decimals += 1;
    }
}

fn logit_of(p: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    (p / (1.0 - p)).ln()
}

/// The card of a risk model's prediction: the risk against the operating threshold (at or
/// above it: warning; below: info), the model and version, the top contributing factors
/// for this patient in words ("systolic bp 88 mm[Hg] raised the risk (+0.62 logit)"), every
/// contribution to six decimals, the intended use and the caveat.
pub fn risk_card(r: &RiskCard) -> Card {
    let above = r.risk >= r.threshold;
    let (risk_shown, threshold_shown) = percents(r.risk, r.threshold);
    let summary = format!(
        "{} risk {} ({} the {} threshold) — {} {}{}",
        r.title,
        risk_shown,
        if above { "at or above" } else { "below" },
        threshold_shown,
        r.model_name,
        r.model_version,
        if r.newer_not_final.is_empty() {
            ""
        } else {
            "; newer readings not yet final were not used"
        }
    );
    let mut contributions: Vec<&Contribution> = r.contributions.iter().collect();
    contributions.sort_by(|a, b| b.logit.abs().total_cmp(&a.logit.abs()));
    let mut detail = format!(
        "**{}**: {} (p = {:.6}; operating threshold {}, p = {:.6}), model {} version {}.\n\n",
        escape(&r.title),
        risk_shown,
        r.risk,
        threshold_shown,
        r.threshold,
        escape(&r.model_name),
        escape(&r.model_version)
    );
    if !contributions.is_empty() {
        detail.push_str("Top contributing factors for this patient:\n\n");
        for c in contributions.iter().take(r.top) {
            detail.push_str(&format!(
                "- {}{} {} the risk ({}{:.2} logit)\n",
                escape(&c.feature),
                c.value
                    .as_deref()
                    .map(|v| format!(" {}", escape(v)))
                    .unwrap_or_default(),
                if c.logit >= 0.0 { "raised" } else { "lowered" },
                if c.logit >= 0.0 { "+" } else { "" },
                c.logit
            ));
        }
        detail.push('\n');
        if let Some(reference) = r.reference_risk {
            let against = match r.method {
                AttributionMethod::KernelShap {
                    background_rows, ..
                } => format!(
                    "the average over the bundle's background sample ({background_rows} training rows: mean logit {:.6}, p = {:.6}",
                    logit_of(reference),
                    reference
                ),
                _ => format!(
                    "the reference patient (the training mean of every input: p = {:.6}, logit {:.6}",
                    reference,
                    logit_of(reference)
                ),
            };
            let how = match r.method {
                AttributionMethod::LinearExact => "Exact for this logistic model: they sum to the difference of the logits.".to_owned(),
                AttributionMethod::OneAtATime => "Model-agnostic: each is the change of the logit when that input alone is set to its reference value; they need not sum to the difference.".to_owned(),
                AttributionMethod::KernelShap { exact: true, .. } => "Model-agnostic Shapley values (KernelSHAP with every coalition of the inputs evaluated: exact against that sample): they sum to the difference of the logits.".to_owned(),
                AttributionMethod::KernelShap { exact: false, coalitions, .. } => format!(
                    "Model-agnostic Shapley values estimated by KernelSHAP from {coalitions} sampled coalitions of the inputs: they sum to the difference of the logits; each is an estimate."
                ),
            };
            detail.push_str(&format!(
                "Contributions are log-odds against {against}; this patient: logit {:.6}). {how}\n\n",
                logit_of(r.risk),
            ));
        }
        detail.push_str("| Factor | Value | Contribution (logit) |\n|---|---|---:|\n");
        for c in &r.contributions {
            detail.push_str(&format!(
                "| {} | {} | {}{:.6} |\n",
                escape(&c.feature),
                c.value.as_deref().map(escape).unwrap_or_default(),
                if c.logit >= 0.0 { "+" } else { "" },
                c.logit
            ));
        }
        detail.push('\n');
    }
    let note = risk_not_final_note(&r.newer_not_final);
    if !note.is_empty() {
        detail.push_str(note.trim_start());
        detail.push('\n');
    }
    detail.push_str(&format!(
        "**Intended use:** {}\n\n*{}*\n",
        escape(&r.intended_use),
        escape(&r.caveat)
    ));
    Card::builder(
        &summary,
        if above {
            Indicator::Warning
        } else {
            Indicator::Info
        },
        r.source.clone(),
    )
    .detail(detail)
    .build()
}

/// The card of a risk model that could not run because inputs are missing (never imputed);
/// `newer`: inputs with a reading not final yet, named as on [`risk_card`].
pub fn risk_missing_card(
    title: &str,
    model: &str,
    missing: &[String],
    newer: &[(String, Option<DateTime<Utc>>)],
    source: Source,
) -> Card {
    let summary = format!(
        "{title} risk not calculated: missing {}",
        plain(&missing.join(", "))
    );
    let mut detail = format!(
        "The model {} needs every input, each within the range it was trained on; inputs are \
         never imputed, and a value outside that range is never used (the model would \
         extrapolate). Missing or unusable:\n\n",
        escape(model)
    );
    for m in missing {
        detail.push_str(&format!("- {}\n", escape(m)));
    }
    detail.push_str(&risk_not_final_note(newer));
    Card::builder(&summary, Indicator::Info, source)
        .detail(detail)
        .build()
}

/// The card of a risk model that cannot answer now (not serving, failed): no score.
/// The card of a risk model not run for this patient (`why`: the patient is recorded as
/// deceased).
pub fn risk_not_applicable_card(title: &str, why: &str, source: Source) -> Card {
    Card::builder(
        &format!("{title} risk not calculated: {why}"),
        Indicator::Info,
        source,
    )
    .detail(format!(
        "The model was not run: {}; no risk is shown.\n",
        escape(why)
    ))
    .build()
}

pub fn risk_unavailable_card(title: &str, model: &str, why: &str, source: Source) -> Card {
    Card::builder(
        &format!("{title} risk not available: {why}"),
        Indicator::Info,
        source,
    )
    .detail(format!(
        "The model {} could not be run ({}); no risk is shown.\n",
        escape(model),
        escape(why)
    ))
    .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_dated_in_the_future_is_named_not_called_unrecorded() {
        let i = Incomplete {
            missing: vec![Parameter::PulseRate, Parameter::Temperature],
            unusable: vec![],
            age: None,
            future_dated: vec![Parameter::PulseRate],
            newer_not_final: vec![],
        };
        let card = news2_card(&Assessment::Incomplete(i), &Wording::default());
        let detail = card.detail.unwrap();
        assert!(
            detail.contains("a value dated in the future was not used"),
            "{detail}"
        );
        assert!(
            detail.contains("no value recorded in the look-back window"),
            "{detail}"
        );
    }

    /// Red-team finding: a FHIR unit's NUL, line breaks and U+202E (which reorders what is
    /// read) reached a risk card's summary, and a bare URL its Markdown detail.
    #[test]
    fn text_from_input_cannot_reorder_or_link() {
        let missing = vec![
            "systolic bp (unit \"a\u{0}b\u{202e}[evil](http://x)\n# H\" not convertible)"
                .to_owned(),
        ];
        let card = risk_missing_card(
            "ICU mortality",
            "icu-mortality",
            &missing,
            &[],
            Source {
                label: "icu-mortality model card".into(),
                url: None,
                icon: None,
                topic: None,
            },
        );
        assert!(
            !card.summary.contains(['\u{0}', '\u{202e}', '\n']),
            "{:?}",
            card.summary
        );
        let detail = card.detail.unwrap();
        assert!(
            !detail.contains('\u{202e}') && !detail.contains("http://"),
            "{detail}"
        );
        assert!(detail.contains("http\\:"), "{detail}");
    }

    fn risk(risk: f64) -> RiskCard {
        RiskCard {
            title: "ICU mortality".into(),
            model_name: "icu-mortality".into(),
            model_version: "1".into(),
            risk,
            threshold: 0.3,
            contributions: vec![
                Contribution {
                    feature: "age".into(),
                    value: Some("81 years".into()),
                    logit: 0.8,
                },
                Contribution {
                    feature: "systolic".into(),
                    value: Some("85 mmHg".into()),
                    logit: 1.2,
                },
                Contribution {
                    feature: "type".into(),
                    value: None,
                    logit: -0.4,
                },
            ],
            top: 2,
            reference_risk: Some(0.2),
            method: AttributionMethod::LinearExact,
            intended_use: "Adult ICU admissions".into(),
            caveat: "Not for clinical use without local validation".into(),
            source: Source {
                label: "icu-mortality model card".into(),
                url: None,
                icon: None,
                topic: None,
            },
            newer_not_final: vec![],
        }
    }

    #[test]
    fn risk_cards() {
        let c = risk_card(&risk(0.34));
        assert_eq!(c.indicator, Indicator::Warning);
        assert_eq!(
            c.summary,
            "ICU mortality risk 34% (at or above the 30% threshold) — icu-mortality 1"
        );
        let d = c.detail.unwrap();
        // Largest first, only the top two.
        let sys = d
            .find("- systolic 85 mmHg raised the risk (+1.20 logit)")
            .unwrap();
        let age = d
            .find("- age 81 years raised the risk (+0.80 logit)")
            .unwrap();
        assert!(sys < age);
        assert!(!d.contains("- type"));
        // Every contribution, to six decimals, in the table.
        assert!(d.contains("| type |  | -0.400000 |"));
        assert!(d.contains("p = 0.340000"));
        assert!(d.contains("*Not for clinical use without local validation*"));
        assert_eq!(risk_card(&risk(0.1)).indicator, Indicator::Info);
        let m = risk_missing_card(
            "Diabetes",
            "pima-diabetes",
            &["pedigree function".into()],
            &[],
            risk(0.1).source,
        );
        assert_eq!(m.indicator, Indicator::Info);
        assert_eq!(
            m.summary,
            "Diabetes risk not calculated: missing pedigree function"
        );
        assert!(!m.detail.unwrap().contains("not yet final"));
    }

    /// A newer reading not final yet is named on a risk card (summary and detail) and on a
    /// card of missing inputs, as on the NEWS2 card; risk cards left it out without a word.
    #[test]
    fn risk_cards_name_newer_readings_not_yet_final() {
        let at = DateTime::parse_from_rfc3339("2026-12-06T10:30:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let newer = vec![
            ("systolic bp".to_owned(), Some(at)),
            ("heart rate".to_owned(), None),
        ];
        let mut r = risk(0.1);
        r.newer_not_final = newer.clone();
        let c = risk_card(&r);
        assert!(
            c.summary
                .ends_with("; newer readings not yet final were not used"),
            "{}",
            c.summary
        );
        let d = c.detail.unwrap();
        assert!(
            d.contains("**Newer readings not yet final were not used**"),
            "{d}"
        );
        assert!(
            d.contains(&format!("- systolic bp: a reading at {}", time(at))),
            "{d}"
        );
        assert!(
            d.contains("- heart rate: a reading whose time cannot be read (it may be newer)"),
            "{d}"
        );
        let m = risk_missing_card(
            "Diabetes",
            "pima-diabetes",
            &["bmi".into()],
            &newer,
            r.source,
        );
        assert!(m.detail.unwrap().contains("- systolic bp: a reading at"));
    }

    #[test]
    fn kernel_shap_cards_say_what_they_are_measured_from() {
        let mut r = risk(0.34);
        r.method = AttributionMethod::KernelShap {
            background_rows: 32,
            coalitions: 62,
            exact: true,
        };
        let d = risk_card(&r).detail.unwrap();
        assert!(
            d.contains("against the average over the bundle's background sample (32 training rows: mean logit -1.386294, p = 0.200000; this patient: logit -0.663294)."),
            "{d}"
        );
        assert!(d.contains("every coalition of the inputs evaluated"));
        r.method = AttributionMethod::KernelShap {
            background_rows: 32,
            coalitions: 126,
            exact: false,
        };
        let d = risk_card(&r).detail.unwrap();
        assert!(d.contains("estimated by KernelSHAP from 126 sampled coalitions"));
        assert!(!d.contains("training mean"));
    }

    /// Red-team finding: rounded to whole percents, p = 0.181894 against a threshold of
    /// 0.183632 read "risk 18% (below the 18% threshold)".
    #[test]
    fn a_risk_and_its_threshold_are_shown_apart() {
        let with = |p: f64, t: f64| {
            let mut r = risk(p);
            r.threshold = t;
            risk_card(&r)
        };
        let d = with(0.181894, 0.183632).detail.unwrap();
        assert!(
            d.contains("18.2% (p = 0.181894; operating threshold 18.4%, p = 0.183632)"),
            "{d}"
        );
        for (p, t, summary) in [
            (
                0.181894,
                0.183632,
                "ICU mortality risk 18.2% (below the 18.4% threshold)",
            ),
            // Two decimals where one is not enough; rounding never reverses the order.
            (
                0.300_4,
                0.3,
                "ICU mortality risk 30.04% (at or above the 30.00% threshold)",
            ),
            (
                0.299_96,
                0.3,
                "ICU mortality risk 29.996% (below the 30.000% threshold)",
            ),
            // Both under 1 %.
            (
                0.004,
                0.006,
                "ICU mortality risk 0.4% (below the 0.6% threshold)",
            ),
            // Equal, or apart in whole percents: as before.
            (
                0.3,
                0.3,
                "ICU mortality risk 30% (at or above the 30% threshold)",
            ),
            (
                0.005,
                0.3,
                "ICU mortality risk <1% (below the 30% threshold)",
            ),
        ] {
            let c = with(p, t);
            assert!(c.summary.starts_with(summary), "{}", c.summary);
        }
    }

    #[test]
    fn indicators_follow_the_band() {
        assert_eq!(indicator(ClinicalRisk::Low), Indicator::Info);
        assert_eq!(indicator(ClinicalRisk::LowMedium), Indicator::Warning);
        assert_eq!(indicator(ClinicalRisk::Medium), Indicator::Warning);
        assert_eq!(indicator(ClinicalRisk::High), Indicator::Critical);
    }

    #[test]
    fn markdown_from_input_is_escaped() {
        assert_eq!(escape("a|b*c\n"), "a\\|b\\*c");
    }
}
