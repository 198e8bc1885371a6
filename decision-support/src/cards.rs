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
//! The source of every card cites RCP NEWS2 (2017) ([`Wording::source_label`],
//! [`Wording::source_url`]).

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::hooks::{Card, Indicator, Source};
use crate::news2::{Assessment, ClinicalRisk, Incomplete, NotApplicable, Scored, SpO2Scale};
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

/// Markdown-escapes text that may come from input (a unit name).
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\`*_{}[]()<>#+-.!|~".contains(c) {
            out.push('\\');
        }
        if !c.is_control() {
            out.push(c);
        }
    }
    out
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
    let summary = format!(
        "NEWS2 {} — {} clinical risk{}",
        score.total,
        score.risk.name(),
        if score.scale == SpO2Scale::Scale2 {
            " (SpO2 scale 2)"
        } else {
            ""
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
        items.push(format!(
            "{}: no value recorded in the look-back window",
            p.name()
        ));
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
    Card::builder(&summary, Indicator::Info, wording.source())
        .detail(wording.finish(detail))
        .build()
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
    };
    Card::builder(summary, Indicator::Info, wording.source())
        .detail(wording.finish(detail.to_owned()))
        .build()
}
