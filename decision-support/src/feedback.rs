//! Feedback on cards (`POST /cds-services/{id}/feedback`), joined to the card it is about.
//!
//! A [`CardLedger`] remembers, for a bounded number of recent cards, which service and which
//! model version issued each; [`CardLedger::accept`] checks a [`FeedbackRequest`] against it
//! (every card must have been issued by the service the feedback is posted to) and turns
//! it into [`FeedbackEvent`]s for the caller to store and count. [`OverrideStats`] counts
//! outcomes per service and model version (the override rate the metrics expose).
//!
//! The ledger is in memory, bounded by [`CardLedger::capacity`]: once a card has been pushed
//! out by newer ones, feedback on it is refused as [`FeedbackRefused::UnknownCard`]. The
//! server keeps the cards and the feedback in a store of its own and puts them back with
//! [`CardLedger::remember`] and [`OverrideStats::count`] after a restart.

use std::collections::{BTreeMap, HashMap, VecDeque};

use chrono::{DateTime, Utc};

use crate::fhir::Coding;
use crate::hooks::{Card, FeedbackError, FeedbackRequest, Outcome};

/// What is remembered of an issued card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCard {
    /// The service that issued it.
    pub service: String,
    /// The model (bundle) and version behind it; `None` for NEWS2 cards.
    pub model: Option<(String, String)>,
    /// The caller it was issued to (the server's id of the EHR client); feedback on it from
    /// another caller is refused (another EHR replaced its outcome: a red-team finding).
    /// `None` for a card stored before the caller was kept: any caller.
    pub client: Option<String>,
    /// When it was issued.
    pub issued_at: DateTime<Utc>,
    /// The uuids of its suggestions, which feedback may name as accepted (kept in memory
    /// only: a card remembered from the store after a restart has none, and Nightingale's
    /// own cards carry no suggestions today).
    pub suggestions: Vec<String>,
}

/// Recent cards by uuid, at most `capacity` (the oldest forgotten first).
#[derive(Debug)]
pub struct CardLedger {
    capacity: usize,
    cards: HashMap<String, IssuedCard>,
    order: VecDeque<String>,
    /// The latest outcome recorded for a card (each card counts once, as its latest
    /// feedback says: a clinician who overrides and later accepts is one acceptance).
    outcomes: HashMap<String, Outcome>,
}

/// One feedback item joined to its card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedbackEvent {
    pub card: String,
    pub service: String,
    pub model: Option<(String, String)>,
    pub outcome: Outcome,
    /// The uuids of the accepted suggestions.
    pub accepted_suggestions: Vec<String>,
    /// The override reason's coding, when given.
    pub override_reason: Option<Coding>,
    /// Whether the clinician wrote a comment (the comment itself is free text that may name
    /// the patient: the caller decides whether and where to keep it).
    pub has_comment: bool,
    pub outcome_timestamp: DateTime<Utc>,
}

/// Why feedback was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FeedbackRefused {
    /// The body is not valid feedback.
    #[error(transparent)]
    Invalid(#[from] FeedbackError),
    /// A card this ledger does not know (never issued, issued long ago, or before a restart).
    #[error("feedback item {index}: unknown card")]
    UnknownCard { index: usize },
    /// A card issued by another service.
    #[error("feedback item {index}: the card was issued by another service")]
    OtherService { index: usize },
    /// A card issued to another caller (another EHR client).
    #[error("feedback item {index}: the card was issued to another client")]
    OtherClient { index: usize },
    /// An accepted suggestion the card does not have.
    #[error("feedback item {index}: the card has no suggestion with that id")]
    UnknownSuggestion { index: usize },
    /// A second item about the same card in one request (each card's outcome counts once).
    #[error("feedback item {index}: repeats the card of item {first}")]
    RepeatedCard { index: usize, first: usize },
    /// An outcome dated before its card was issued, or in the future (beyond
    /// [`FEEDBACK_CLOCK_SKEW`]): a clock error or a made-up date, not an outcome.
    #[error(
        "feedback item {index}: outcomeTimestamp is before the card was issued or in the future"
    )]
    TimestampOutOfRange { index: usize },
}

/// How far an outcome's time may lie before its card's issue or after now (clocks differ).
pub const FEEDBACK_CLOCK_SKEW: chrono::Duration = chrono::Duration::minutes(5);

impl CardLedger {
    /// A ledger of at most `capacity` cards.
    pub fn new(capacity: usize) -> CardLedger {
        CardLedger {
            capacity: capacity.max(1),
            cards: HashMap::new(),
            order: VecDeque::new(),
            outcomes: HashMap::new(),
        }
    }

    /// How many cards it holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many cards it holds.
    pub fn len(&self) -> usize {
        self.cards.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.cards.is_empty()
    }

    /// Remembers the cards of a response.
    pub fn record<'a>(
        &mut self,
        cards: impl IntoIterator<Item = &'a Card>,
        service: &str,
        model: Option<(&str, &str)>,
        client: &str,
        now: DateTime<Utc>,
    ) {
        for card in cards {
            self.remember(
                card.uuid.clone(),
                IssuedCard {
                    service: service.to_owned(),
                    model: model.map(|(m, v)| (m.to_owned(), v.to_owned())),
                    client: Some(client.to_owned()),
                    issued_at: now,
                    suggestions: card
                        .suggestions
                        .iter()
                        .filter_map(|s| s.uuid.clone())
                        .collect(),
                },
            );
        }
    }

    /// Remembers one card by its uuid (the oldest is forgotten when full).
    pub fn remember(&mut self, uuid: String, card: IssuedCard) {
        if let Some(known) = self.cards.get_mut(&uuid) {
            *known = card;
            return;
        }
        if self.cards.len() >= self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.cards.remove(&oldest);
            self.outcomes.remove(&oldest);
        }
        self.order.push_back(uuid.clone());
        self.cards.insert(uuid, card);
    }

    /// The card with this uuid, if remembered.
    pub fn get(&self, uuid: &str) -> Option<&IssuedCard> {
        self.cards.get(uuid)
    }

    /// Records the outcome of each accepted event on its card and returns the outcome each
    /// card had before (`None`: its first feedback), for [`OverrideStats::settle`].
    pub fn settle(&mut self, events: &[FeedbackEvent]) -> Vec<Option<Outcome>> {
        events
            .iter()
            .map(|e| {
                if self.cards.contains_key(&e.card) {
                    self.outcomes.insert(e.card.clone(), e.outcome)
                } else {
                    None
                }
            })
            .collect()
    }

    /// Sets a remembered card's latest outcome (restoring from a store).
    pub fn restore_outcome(&mut self, uuid: &str, outcome: Outcome) {
        if self.cards.contains_key(uuid) {
            self.outcomes.insert(uuid.to_owned(), outcome);
        }
    }

    /// Validates feedback posted to `service` and joins every item to its card. All or
    /// nothing: one bad item refuses the request.
    pub fn accept(
        &self,
        service: &str,
        client: &str,
        request: &FeedbackRequest,
    ) -> Result<Vec<FeedbackEvent>, FeedbackRefused> {
        request.validate()?;
        let mut events = vec![];
        let mut seen: HashMap<String, usize> = HashMap::new();
        for (index, f) in request.feedback.iter().enumerate() {
            let key = uuid::Uuid::parse_str(&f.card)
                .map(|u| u.hyphenated().to_string())
                .unwrap_or_default();
            let card = self
                .cards
                .get(&key)
                .or_else(|| self.cards.get(&f.card))
                .ok_or(FeedbackRefused::UnknownCard { index })?;
            if card.service != service {
                return Err(FeedbackRefused::OtherService { index });
            }
            if card.client.as_deref().is_some_and(|c| c != client) {
                return Err(FeedbackRefused::OtherClient { index });
            }
            if let Some(&first) = seen.get(&key) {
                return Err(FeedbackRefused::RepeatedCard { index, first });
            }
            seen.insert(key.clone(), index);
            if f.accepted_suggestions
                .iter()
                .any(|s| !card.suggestions.contains(&s.id))
            {
                return Err(FeedbackRefused::UnknownSuggestion { index });
            }
            let outcome_timestamp = DateTime::parse_from_rfc3339(&f.outcome_timestamp)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| FeedbackError::Timestamp { index })?;
            if outcome_timestamp < card.issued_at - FEEDBACK_CLOCK_SKEW
                || outcome_timestamp > Utc::now() + FEEDBACK_CLOCK_SKEW
            {
                return Err(FeedbackRefused::TimestampOutOfRange { index });
            }
            events.push(FeedbackEvent {
                card: key,
                service: card.service.clone(),
                model: card.model.clone(),
                outcome: f.outcome,
                accepted_suggestions: f
                    .accepted_suggestions
                    .iter()
                    .map(|s| s.id.clone())
                    .collect(),
                override_reason: f.override_reason.as_ref().and_then(|r| r.reason.clone()),
                has_comment: f
                    .override_reason
                    .as_ref()
                    .is_some_and(|r| r.user_comment.is_some()),
                outcome_timestamp,
            });
        }
        Ok(events)
    }
}

/// (service, (model, version)).
type StatsKey = (String, Option<(String, String)>);

/// Outcomes counted per service and model version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverrideStats {
    /// (accepted, overridden) by key.
    counts: BTreeMap<StatsKey, (u64, u64)>,
}

impl OverrideStats {
    /// Counts events.
    pub fn add(&mut self, events: &[FeedbackEvent]) {
        for e in events {
            self.count(&e.service, e.model.clone(), e.outcome, 1);
        }
    }

    /// Counts events whose cards had `previous` outcomes ([`CardLedger::settle`]): a card's
    /// earlier outcome is taken back, so each card counts once, as its latest feedback says.
    pub fn settle(&mut self, events: &[FeedbackEvent], previous: &[Option<Outcome>]) {
        for (e, before) in events.iter().zip(previous) {
            if let Some(before) = before {
                let c = self
                    .counts
                    .entry((e.service.clone(), e.model.clone()))
                    .or_default();
                match before {
                    Outcome::Accepted => c.0 = c.0.saturating_sub(1),
                    Outcome::Overridden => c.1 = c.1.saturating_sub(1),
                }
            }
            self.count(&e.service, e.model.clone(), e.outcome, 1);
        }
    }

    /// Counts `n` outcomes of one service and model version.
    pub fn count(
        &mut self,
        service: &str,
        model: Option<(String, String)>,
        outcome: Outcome,
        n: u64,
    ) {
        let c = self.counts.entry((service.to_owned(), model)).or_default();
        match outcome {
            Outcome::Accepted => c.0 += n,
            Outcome::Overridden => c.1 += n,
        }
    }

    /// (accepted, overridden) for a service and model version.
    pub fn counts(&self, service: &str, model: Option<(&str, &str)>) -> (u64, u64) {
        let key = (
            service.to_owned(),
            model.map(|(m, v)| (m.to_owned(), v.to_owned())),
        );
        self.counts.get(&key).copied().unwrap_or_default()
    }

    /// The share of feedback that overrode the cards, `None` before any feedback.
    pub fn override_rate(&self, service: &str, model: Option<(&str, &str)>) -> Option<f64> {
        let (accepted, overridden) = self.counts(service, model);
        let total = accepted + overridden;
        (total > 0).then(|| overridden as f64 / total as f64)
    }

    /// Every (service, model) with its (accepted, overridden) counts.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<(&str, &str)>, u64, u64)> {
        self.counts.iter().map(|((s, m), (a, o))| {
            (
                s.as_str(),
                m.as_ref().map(|(m, v)| (m.as_str(), v.as_str())),
                *a,
                *o,
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::{Indicator, Source};
    use serde_json::json;

    fn card() -> Card {
        Card::builder(
            "x",
            Indicator::Info,
            Source {
                label: "s".into(),
                url: None,
                icon: None,
                topic: None,
            },
        )
        .suggestion(crate::hooks::Suggestion {
            label: "do it".into(),
            uuid: Some("e56e1945-20b3-4393-8503-a1a20fd73152".into()),
            is_recommended: None,
            actions: vec![],
        })
        .build()
    }

    fn feedback(card: &str, outcome: &str) -> FeedbackRequest {
        let mut item = json!({"card": card, "outcome": outcome,
            "outcomeTimestamp": "2024-05-01T12:05:00Z"});
        if outcome == "accepted" {
            item["acceptedSuggestions"] = json!([{"id": "e56e1945-20b3-4393-8503-a1a20fd73152"}]);
        } else {
            item["overrideReason"] = json!({"reason": {"system": "http://example.org/r", "code": "not-relevant"},
                "userComment": "free text"});
        }
        serde_json::from_value(json!({"feedback": [item]})).unwrap()
    }

    #[test]
    fn an_outcome_before_its_card_or_in_the_future_is_refused() {
        let now = "2024-05-01T12:00:00Z".parse().unwrap();
        let mut ledger = CardLedger::new(2);
        let a = card();
        ledger.record([&a], "risk", Some(("icu-mortality", "1")), "ehr", now);
        let at = |t: &str| {
            let mut f = feedback(&a.uuid, "overridden");
            f.feedback[0].outcome_timestamp = t.to_owned();
            f
        };
        for bad in [
            "0000-01-01T00:00:00Z",
            "2024-05-01T11:50:00Z",
            "9999-12-31T23:59:59Z",
        ] {
            assert!(
                matches!(
                    ledger.accept("risk", "ehr", &at(bad)),
                    Err(FeedbackRefused::TimestampOutOfRange { index: 0 })
                ),
                "{bad}"
            );
        }
        // Within the skew of the issue time, and any time since.
        for good in [
            "2024-05-01T11:57:00Z",
            "2024-05-01T12:00:00Z",
            "2025-01-01T00:00:00Z",
        ] {
            assert!(ledger.accept("risk", "ehr", &at(good)).is_ok(), "{good}");
        }
    }

    #[test]
    fn joins_feedback_to_cards_and_counts_overrides() {
        let now = "2024-05-01T12:00:00Z".parse().unwrap();
        let mut ledger = CardLedger::new(2);
        let (a, b, c) = (card(), card(), card());
        ledger.record([&a], "risk", Some(("icu-mortality", "1")), "ehr", now);
        ledger.record([&b], "nightingale-news2", None, "ehr", now);
        let mut stats = OverrideStats::default();
        let e = ledger
            .accept("risk", "ehr", &feedback(&a.uuid, "overridden"))
            .unwrap();
        assert_eq!(e[0].model, Some(("icu-mortality".into(), "1".into())));
        assert!(e[0].has_comment);
        assert_eq!(
            e[0].override_reason.as_ref().unwrap().code.as_deref(),
            Some("not-relevant")
        );
        let previous = ledger.settle(&e);
        assert_eq!(previous, vec![None]);
        stats.settle(&e, &previous);
        // The same card's later feedback (another request) replaces its outcome: one card,
        // counted once, as accepted.
        let later = ledger
            .accept("risk", "ehr", &feedback(&a.uuid, "accepted"))
            .unwrap();
        let previous = ledger.settle(&later);
        assert_eq!(previous, vec![Some(Outcome::Overridden)]);
        stats.settle(&later, &previous);
        assert_eq!(stats.counts("risk", Some(("icu-mortality", "1"))), (1, 0));
        assert_eq!(
            stats.override_rate("risk", Some(("icu-mortality", "1"))),
            Some(0.0)
        );
        assert_eq!(
            stats.override_rate("risk", Some(("icu-mortality", "2"))),
            None
        );
        // Feedback posted to the wrong service.
        assert!(matches!(
            ledger.accept("risk", "ehr", &feedback(&b.uuid, "overridden")),
            Err(FeedbackRefused::OtherService { index: 0 })
        ));
        // Feedback from another client than the card's (it replaced the first EHR's
        // outcome: a red-team finding); a card kept without its client takes any.
        assert!(matches!(
            ledger.accept("risk", "other-ehr", &feedback(&a.uuid, "overridden")),
            Err(FeedbackRefused::OtherClient { index: 0 })
        ));
        let mut kept = ledger.get(&a.uuid).unwrap().clone();
        kept.client = None;
        ledger.remember(a.uuid.clone(), kept);
        assert!(
            ledger
                .accept("risk", "other-ehr", &feedback(&a.uuid, "overridden"))
                .is_ok()
        );
        // A third card pushes the first out.
        ledger.record([&c], "risk", None, "ehr", now);
        assert_eq!(ledger.len(), 2);
        assert!(matches!(
            ledger.accept("risk", "ehr", &feedback(&a.uuid, "overridden")),
            Err(FeedbackRefused::UnknownCard { index: 0 })
        ));
        // Upper-case uuids name the same card.
        assert!(
            ledger
                .accept(
                    "risk",
                    "ehr",
                    &feedback(&c.uuid.to_uppercase(), "overridden")
                )
                .is_ok()
        );
        // A suggestion the card does not have, and one card twice in one request (which
        // would count its outcome twice), are refused.
        let mut made_up = feedback(&c.uuid, "accepted");
        made_up.feedback[0].accepted_suggestions[0].id = "not-on-the-card".into();
        assert!(matches!(
            ledger.accept("risk", "ehr", &made_up),
            Err(FeedbackRefused::UnknownSuggestion { index: 0 })
        ));
        let mut twice = feedback(&c.uuid, "overridden");
        let again = twice.feedback[0].clone();
        twice.feedback.push(again);
        assert!(matches!(
            ledger.accept("risk", "ehr", &twice),
            Err(FeedbackRefused::RepeatedCard { index: 1, first: 0 })
        ));
    }
}
