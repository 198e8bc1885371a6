//! CDS Hooks 2.0 types (<https://cds-hooks.hl7.org/2.0/>): discovery, the hook request, the
//! response with its cards, and feedback.
//!
//! Input types ([`HookRequest`], [`FeedbackRequest`]) ignore fields they do not know, as
//! the specification requires of services. Output types ([`Card`], [`CdsResponse`],
//! [`ServiceDescriptor`]) are strict: they are built through constructors that enforce the
//! specification's rules (a summary under 140 characters, a v4 uuid on every card, a
//! `selectionBehavior` whenever there are suggestions), and their `Deserialize` refuses
//! unknown fields so that tests reading our own output back catch a stray field.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fhir::Coding;

/// The longest summary, in characters: the specification asks for "<140".
pub const MAX_SUMMARY_CHARS: usize = 139;

/// One service in the discovery response (`GET /cds-services`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceDescriptor {
    /// The hook this service is invoked on (`patient-view`, `order-select`, …).
    pub hook: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub description: String,
    /// The `{id}` of `POST /cds-services/{id}`.
    pub id: String,
    /// Prefetch templates by key.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub prefetch: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_requirements: Option<String>,
}

/// The discovery response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    pub services: Vec<ServiceDescriptor>,
}

/// `fhirAuthorization` of a hook request: an OAuth 2.0 token for the EHR's FHIR server.
/// Its `Debug` hides the token.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct FhirAuthorization {
    pub access_token: String,
    /// "Bearer".
    pub token_type: String,
    /// Lifetime in seconds.
    pub expires_in: u64,
    pub scope: String,
    /// The OAuth client id of this service at the EHR.
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
}

impl fmt::Debug for FhirAuthorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FhirAuthorization")
            .field("access_token", &"<redacted>")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("scope", &self.scope)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// A hook request (`POST /cds-services/{id}`). Unknown fields are ignored.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HookRequest {
    pub hook: String,
    /// A UUID for this invocation.
    pub hook_instance: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_authorization: Option<FhirAuthorization>,
    /// Hook-specific context (`patientId`, `userId`, `encounterId`, `draftOrders`, …).
    pub context: serde_json::Map<String, Value>,
    /// Prefetched data by key; a key's value is `null` when the EHR could not fetch it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<BTreeMap<String, Value>>,
}

/// Why a hook request cannot be served.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The request names another hook than the service's.
    #[error("this service answers the hook \"{expected}\", not the one requested")]
    WrongHook { expected: String },
    /// `hookInstance` is not a UUID.
    #[error("hookInstance is not a UUID")]
    HookInstance,
    /// A context field the hook requires is absent or not a string.
    #[error("context.{field} is missing or not a string")]
    Context { field: &'static str },
    /// `fhirAuthorization` without `fhirServer` (the specification requires both).
    #[error("fhirAuthorization is given without fhirServer")]
    AuthorizationWithoutServer,
    /// `fhirServer` is not an http(s) URL.
    #[error("fhirServer is not an http(s) URL")]
    FhirServer,
    /// A prefetch entry is not FHIR this crate can read.
    #[error("prefetch \"{key}\": {source}")]
    Prefetch {
        key: String,
        #[source]
        source: crate::fhir::FhirError,
    },
    /// A context field a prefetch template names is absent or not a string.
    #[error("context.{field} is missing, empty or not a string (the service's prefetch needs it)")]
    TemplateContext { field: String },
    /// A prefetch template uses a token this crate does not fill.
    #[error("prefetch template token {{{{{token}}}}} is not supported")]
    Template { token: String },
    /// A context value that would be a path segment of its own (`.` or `..`), which a URL
    /// resolves away: `Patient/..` would read the server's base.
    #[error("context.{field} is not a FHIR id")]
    DotSegment { field: String },
}

impl HookRequest {
    /// Checks the envelope: the hook, `hookInstance` a UUID, `fhirServer` present and
    /// http(s) when `fhirAuthorization` is.
    pub fn validate(&self, expected_hook: &str) -> Result<(), RequestError> {
        if self.hook != expected_hook {
            return Err(RequestError::WrongHook {
                expected: expected_hook.to_owned(),
            });
        }
        uuid::Uuid::parse_str(&self.hook_instance).map_err(|_| RequestError::HookInstance)?;
        match (&self.fhir_server, &self.fhir_authorization) {
            (None, Some(_)) => return Err(RequestError::AuthorizationWithoutServer),
            (Some(s), _) if !(s.starts_with("https://") || s.starts_with("http://")) => {
                return Err(RequestError::FhirServer);
            }
            _ => {}
        }
        Ok(())
    }

    /// A string field of the context.
    pub fn context_str(&self, field: &str) -> Option<&str> {
        self.context.get(field).and_then(Value::as_str)
    }

    /// `context.patientId`.
    pub fn patient_id(&self) -> Option<&str> {
        self.context_str("patientId")
    }

    /// The prefetch entry under `key` (`None` when absent or `null`).
    pub fn prefetched(&self, key: &str) -> Option<&Value> {
        self.prefetch.as_ref()?.get(key).filter(|v| !v.is_null())
    }

    /// Whether the client answered the prefetch `key`, with data or with `null` (CDS Hooks
    /// 2.0: `null` when it has no data for it; the key left out when it chose not to fetch
    /// it or could not).
    pub fn answered(&self, key: &str) -> bool {
        self.prefetch.as_ref().is_some_and(|p| p.contains_key(key))
    }
}

/// The prefetch tokens of CDS Hooks 2.0 naming the user, each with the resource type whose
/// id it stands for: the id of `context.userId` (`Practitioner/123`) when it is of that type.
pub const USER_TOKENS: [(&str, &str); 4] = [
    ("userPractitionerId", "Practitioner"),
    ("userPractitionerRoleId", "PractitionerRole"),
    ("userPatientId", "Patient"),
    ("userRelatedPersonId", "RelatedPerson"),
];

/// The value of the user token `token` for `request`: `None` when `token` is not one; `Some`
/// of `None` when the call's `userId` is not of the token's resource type (or absent).
fn user_token<'a>(token: &str, request: &'a HookRequest) -> Option<Option<&'a str>> {
    let (_, kind) = USER_TOKENS.iter().find(|(name, _)| *name == token)?;
    Some(
        request
            .context_str("userId")
            .and_then(|user| user.split_once('/'))
            .filter(|(k, id)| k == kind && !id.is_empty() && !id.contains('/'))
            .map(|(_, id)| id),
    )
}

/// Fills a prefetch template's `{{context.NAME}}` tokens with the request's context strings,
/// and its user tokens (`{{userPractitionerId}}`, … [`USER_TOKENS`]) with the id of the
/// call's `userId` (percent-encoded for a URL query), e.g.
/// `Observation?patient={{context.patientId}}`. Any other token is an error; a user token
/// whose type is not the `userId`'s is a missing context field.
pub fn render_prefetch(template: &str, request: &HookRequest) -> Result<String, RequestError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| RequestError::Template {
            token: after.chars().take(40).collect(),
        })?;
        let token = after[..end].trim();
        let value = match user_token(token, request) {
            Some(id) => id.ok_or_else(|| RequestError::TemplateContext {
                field: token.to_owned(),
            })?,
            None => {
                let name =
                    token
                        .strip_prefix("context.")
                        .ok_or_else(|| RequestError::Template {
                            token: token.chars().take(40).collect(),
                        })?;
                // An empty value is no value: `Condition?patient=` asks many FHIR servers for
                // every patient's Conditions (a re-attack's finding).
                request
                    .context_str(name)
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| RequestError::TemplateContext {
                        field: name.chars().take(40).collect(),
                    })?
            }
        };
        if !value.is_empty() && value.bytes().all(|b| b == b'.') {
            return Err(RequestError::DotSegment {
                field: token
                    .trim_start_matches("context.")
                    .chars()
                    .take(40)
                    .collect(),
            });
        }
        for b in value.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// How urgent a card is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Indicator {
    Info,
    Warning,
    Critical,
}

/// The source of a card's information.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    pub label: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub icon: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub topic: Option<Coding>,
}

/// `create`, `update` or `delete`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionType {
    Create,
    Update,
    Delete,
}

/// An action of a suggestion (or a system action).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Action {
    #[serde(rename = "type")]
    pub action_type: ActionType,
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resource: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub resource_id: Option<String>,
}

/// A suggestion of a card.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Suggestion {
    pub label: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub is_recommended: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub actions: Vec<Action>,
}

/// How the suggestions of a card may be chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SelectionBehavior {
    AtMostOne,
    Any,
}

/// `absolute` (a web page) or `smart` (a SMART app to launch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkType {
    Absolute,
    Smart,
}

/// A link of a card.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Link {
    pub label: String,
    pub url: String,
    #[serde(rename = "type")]
    pub link_type: LinkType,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub app_context: Option<String>,
}

/// A card. Build one with [`Card::builder`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Card {
    /// A v4 UUID, so feedback can name the card.
    pub uuid: String,
    /// At most [`MAX_SUMMARY_CHARS`] characters.
    pub summary: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub detail: Option<String>,
    pub indicator: Indicator,
    pub source: Source,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub suggestions: Vec<Suggestion>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub selection_behavior: Option<SelectionBehavior>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub override_reasons: Vec<Coding>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub links: Vec<Link>,
}

impl Card {
    /// A builder of a card with this summary, indicator and source.
    pub fn builder(summary: &str, indicator: Indicator, source: Source) -> CardBuilder {
        CardBuilder {
            summary: summary.to_owned(),
            indicator,
            source,
            detail: None,
            suggestions: vec![],
            selection_behavior: None,
            override_reasons: vec![],
            links: vec![],
        }
    }
}

/// Builds a [`Card`] that follows the specification.
#[derive(Clone, Debug)]
pub struct CardBuilder {
    summary: String,
    indicator: Indicator,
    source: Source,
    detail: Option<String>,
    suggestions: Vec<Suggestion>,
    selection_behavior: Option<SelectionBehavior>,
    override_reasons: Vec<Coding>,
    links: Vec<Link>,
}

impl CardBuilder {
    /// The card's detail (GitHub-flavoured markdown).
    pub fn detail(mut self, markdown: impl Into<String>) -> Self {
        self.detail = Some(markdown.into());
        self
    }

    /// Adds a suggestion (given a v4 uuid when it has none).
    pub fn suggestion(mut self, mut suggestion: Suggestion) -> Self {
        suggestion
            .uuid
            .get_or_insert_with(|| uuid::Uuid::new_v4().to_string());
        self.suggestions.push(suggestion);
        self
    }

    /// How suggestions may be selected (default `at-most-one` when there are any).
    pub fn selection_behavior(mut self, behavior: SelectionBehavior) -> Self {
        self.selection_behavior = Some(behavior);
        self
    }

    /// Adds a reason a clinician may give for overriding the card.
    pub fn override_reason(mut self, reason: Coding) -> Self {
        self.override_reasons.push(reason);
        self
    }

    /// Adds a link.
    pub fn link(mut self, link: Link) -> Self {
        self.links.push(link);
        self
    }

    /// The card, with a new v4 uuid and its summary cut to [`MAX_SUMMARY_CHARS`]
    /// characters (on a character boundary, ending in "…").
    pub fn build(self) -> Card {
        let selection_behavior = if self.suggestions.is_empty() {
            None
        } else {
            Some(
                self.selection_behavior
                    .unwrap_or(SelectionBehavior::AtMostOne),
            )
        };
        Card {
            uuid: uuid::Uuid::new_v4().to_string(),
            summary: truncate_summary(&self.summary),
            detail: self.detail,
            indicator: self.indicator,
            source: self.source,
            suggestions: self.suggestions,
            selection_behavior,
            override_reasons: self.override_reasons,
            links: self.links,
        }
    }
}

/// Cuts `summary` to [`MAX_SUMMARY_CHARS`] characters, ending in "…" when cut.
pub fn truncate_summary(summary: &str) -> String {
    let summary = summary.trim();
    if summary.chars().count() <= MAX_SUMMARY_CHARS {
        return summary.to_owned();
    }
    let mut out: String = summary.chars().take(MAX_SUMMARY_CHARS - 1).collect();
    out.truncate(out.trim_end().len());
    out.push('…');
    out
}

/// The response to a hook request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CdsResponse {
    pub cards: Vec<Card>,
    #[serde(default)]
    pub system_actions: Vec<Action>,
}

/// `accepted` or `overridden`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Accepted,
    Overridden,
}

/// A suggestion the clinician accepted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptedSuggestion {
    pub id: String,
}

/// Why the clinician overrode a card.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OverrideReason {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Coding>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_comment: Option<String>,
}

/// One feedback item (`POST /cds-services/{id}/feedback`). Unknown fields are ignored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Feedback {
    /// The uuid of the card.
    pub card: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accepted_suggestions: Vec<AcceptedSuggestion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub override_reason: Option<OverrideReason>,
    /// ISO 8601, e.g. `2024-05-01T12:00:00Z`.
    pub outcome_timestamp: String,
}

/// The feedback request body: `{"feedback": [...]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedbackRequest {
    pub feedback: Vec<Feedback>,
}

/// Why feedback is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FeedbackError {
    #[error("feedback item {index}: card is not a UUID")]
    Card { index: usize },
    #[error("feedback item {index}: outcomeTimestamp is not an ISO 8601 date-time")]
    Timestamp { index: usize },
    #[error("feedback item {index}: an accepted outcome names no accepted suggestion")]
    NoSuggestion { index: usize },
    #[error("feedback item {index}: overrideReason given with an accepted outcome")]
    ReasonOnAccepted { index: usize },
    #[error("more than {limit} feedback items")]
    TooMany { limit: usize },
    #[error("feedback item {index}: userComment over {limit} characters")]
    Comment { index: usize, limit: usize },
    #[error(
        "feedback item {index}: overrideReason.reason system, code or display over {limit} characters"
    )]
    Coding { index: usize, limit: usize },
}

/// The most items one feedback request may carry.
pub const MAX_FEEDBACK_ITEMS: usize = 100;
/// The longest `userComment` kept.
pub const MAX_COMMENT_CHARS: usize = 1000;
/// The longest `system`, `code` or `display` of an override reason (they are stored with the
/// feedback: a code system URL or a code is far shorter).
pub const MAX_CODING_CHARS: usize = 256;

impl FeedbackRequest {
    /// Checks every item: the card a UUID, the timestamp a date-time, an accepted outcome
    /// with suggestions and no override reason.
    pub fn validate(&self) -> Result<(), FeedbackError> {
        if self.feedback.len() > MAX_FEEDBACK_ITEMS {
            return Err(FeedbackError::TooMany {
                limit: MAX_FEEDBACK_ITEMS,
            });
        }
        for (index, f) in self.feedback.iter().enumerate() {
            uuid::Uuid::parse_str(&f.card).map_err(|_| FeedbackError::Card { index })?;
            chrono::DateTime::parse_from_rfc3339(&f.outcome_timestamp)
                .map_err(|_| FeedbackError::Timestamp { index })?;
            match f.outcome {
                Outcome::Accepted if f.accepted_suggestions.is_empty() => {
                    return Err(FeedbackError::NoSuggestion { index });
                }
                Outcome::Accepted if f.override_reason.is_some() => {
                    return Err(FeedbackError::ReasonOnAccepted { index });
                }
                _ => {}
            }
            if f.override_reason
                .as_ref()
                .and_then(|r| r.user_comment.as_ref())
                .is_some_and(|c| c.chars().count() > MAX_COMMENT_CHARS)
            {
                return Err(FeedbackError::Comment {
                    index,
                    limit: MAX_COMMENT_CHARS,
                });
            }
            if let Some(c) = f.override_reason.as_ref().and_then(|r| r.reason.as_ref())
                && [&c.system, &c.code, &c.display]
                    .into_iter()
                    .flatten()
                    .any(|t| t.chars().count() > MAX_CODING_CHARS)
            {
                return Err(FeedbackError::Coding {
                    index,
                    limit: MAX_CODING_CHARS,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn source() -> Source {
        Source {
            label: "Test".into(),
            url: None,
            icon: None,
            topic: None,
        }
    }

    /// The patient-view example request of the CDS Hooks 2.0 specification (with an
    /// extra field a service must ignore).
    fn spec_request() -> Value {
        json!({
            "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "fhirServer": "http://hooks.smarthealthit.org:9080",
            "hook": "patient-view",
            "fhirAuthorization": {
                "access_token": "some-opaque-fhir-access-token",
                "token_type": "Bearer",
                "expires_in": 300,
                "scope": "user/Patient.read user/Observation.read",
                "subject": "cds-service4"
            },
            "context": {
                "userId": "Practitioner/example",
                "patientId": "1288992",
                "encounterId": "89284"
            },
            "prefetch": {
                "patientToGreet": {
                    "resourceType": "Patient",
                    "gender": "male",
                    "birthDate": "1925-12-23",
                    "id": "1288992",
                    "active": true
                },
                "missing": null
            },
            "extension-from-the-future": {"x": 1}
        })
    }

    #[test]
    fn reads_the_spec_request_leniently() {
        let r: HookRequest = serde_json::from_value(spec_request()).unwrap();
        r.validate("patient-view").unwrap();
        assert_eq!(r.patient_id(), Some("1288992"));
        assert!(r.prefetched("patientToGreet").is_some());
        assert!(r.prefetched("missing").is_none());
        assert!(!format!("{r:?}").contains("some-opaque-fhir-access-token"));
        assert!(matches!(
            r.validate("order-select"),
            Err(RequestError::WrongHook { .. })
        ));
        let mut bad = r.clone();
        bad.fhir_server = None;
        assert!(matches!(
            bad.validate("patient-view"),
            Err(RequestError::AuthorizationWithoutServer)
        ));
        bad.hook_instance = "x".into();
        assert!(matches!(
            bad.validate("patient-view"),
            Err(RequestError::HookInstance)
        ));
    }

    #[test]
    fn reads_an_order_select_request_and_urn_uuids() {
        // The shape of the specification's order-select example: draft orders in context.
        let r: HookRequest = serde_json::from_value(json!({
            "hook": "order-select",
            "hookInstance": "urn:uuid:d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
            "context": {
                "userId": "Practitioner/123",
                "patientId": "1288992",
                "encounterId": "89284",
                "selections": ["MedicationRequest/smart-MedicationRequest-103"],
                "draftOrders": {"resourceType": "Bundle", "entry": [{"resource": {
                    "resourceType": "MedicationRequest", "id": "smart-MedicationRequest-103",
                    "status": "draft", "intent": "order",
                    "subject": {"reference": "Patient/1288992"}}}]}
            }
        }))
        .unwrap();
        r.validate("order-select").unwrap();
        assert_eq!(r.patient_id(), Some("1288992"));
        assert!(r.context.get("draftOrders").is_some());
        assert!(r.prefetch.is_none());
    }

    #[test]
    fn renders_prefetch_templates() {
        let r: HookRequest = serde_json::from_value(spec_request()).unwrap();
        assert_eq!(
            render_prefetch(
                "Observation?patient={{context.patientId}}&category=vital-signs",
                &r
            )
            .unwrap(),
            "Observation?patient=1288992&category=vital-signs"
        );
        let mut r2 = r.clone();
        r2.context.insert("patientId".into(), json!("a b&c=d"));
        assert_eq!(
            render_prefetch("Patient/{{ context.patientId }}", &r2).unwrap(),
            "Patient/a%20b%26c%3Dd"
        );
        // A user token: the id of `userId` when of its type, else a missing context field.
        let user = r.context_str("userId").unwrap().to_owned();
        match user.split_once('/') {
            Some(("Practitioner", id)) => assert_eq!(
                render_prefetch("Practitioner/{{userPractitionerId}}", &r).unwrap(),
                format!("Practitioner/{id}")
            ),
            _ => assert!(render_prefetch("Practitioner/{{userPractitionerId}}", &r).is_err()),
        }
        assert!(matches!(
            render_prefetch("Patient/{{userPatientId}}", &r),
            Err(RequestError::TemplateContext { .. })
        ));
        assert!(render_prefetch("Patient/{{userNobodyId}}", &r).is_err());
        assert!(render_prefetch("Patient/{{context.nothing}}", &r).is_err());
        assert!(render_prefetch("Patient/{{context.patientId", &r).is_err());
        // `Patient/..` would be the server's base once a URL resolves it.
        for dots in [".", "..", "..."] {
            let mut r3 = r.clone();
            r3.context.insert("patientId".into(), json!(dots));
            assert!(matches!(
                render_prefetch("Patient/{{context.patientId}}", &r3),
                Err(RequestError::DotSegment { .. })
            ));
        }
        r2.context.insert("patientId".into(), json!("a.b..c"));
        assert_eq!(
            render_prefetch("Patient/{{context.patientId}}", &r2).unwrap(),
            "Patient/a.b..c"
        );
    }

    #[test]
    fn cards_follow_the_spec() {
        let long = "é".repeat(200);
        let card = Card::builder(&long, Indicator::Warning, source())
            .suggestion(Suggestion {
                label: "Do it".into(),
                uuid: None,
                is_recommended: Some(true),
                actions: vec![],
            })
            .build();
        assert_eq!(card.summary.chars().count(), MAX_SUMMARY_CHARS);
        assert!(card.summary.ends_with('…'));
        assert_eq!(
            uuid::Uuid::parse_str(&card.uuid).unwrap().get_version_num(),
            4
        );
        assert_eq!(card.selection_behavior, Some(SelectionBehavior::AtMostOne));
        assert!(card.suggestions[0].uuid.is_some());
        // Exactly 139 characters is kept whole.
        let s = "x".repeat(139);
        assert_eq!(truncate_summary(&s), s);
        let v = serde_json::to_value(CdsResponse {
            cards: vec![card],
            system_actions: vec![],
        })
        .unwrap();
        assert_eq!(v["cards"][0]["indicator"], "warning");
        assert_eq!(v["cards"][0]["selectionBehavior"], "at-most-one");
        assert_eq!(v["systemActions"], json!([]));
        assert!(v["cards"][0].get("links").is_none());
        // Our output read back strictly.
        let back: CdsResponse = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back.cards.len(), 1);
        let mut extra = v;
        extra["cards"][0]["surprise"] = json!(1);
        assert!(serde_json::from_value::<CdsResponse>(extra).is_err());
    }

    #[test]
    fn feedback() {
        let ok: FeedbackRequest = serde_json::from_value(json!({"feedback": [
            {"card": "9368d37b-283f-44a0-93ea-547cebab93ed", "outcome": "overridden",
             "overrideReason": {"reason": {"code": "reason-code-provided-by-service",
               "system": "http://example.org/cds-services/fhir/CodeSystem/override-reasons"},
               "userComment": "clinician comment"},
             "outcomeTimestamp": "2020-12-11T00:00:00Z", "unknown": true},
            {"card": "9368d37b-283f-44a0-93ea-547cebab93ed", "outcome": "accepted",
             "acceptedSuggestions": [{"id": "e56e1945-20b3-4393-8503-a1a20fd73152"}],
             "outcomeTimestamp": "2020-12-11T00:00:00Z"}
        ]}))
        .unwrap();
        ok.validate().unwrap();
        let mut bad = ok.clone();
        bad.feedback[1].accepted_suggestions.clear();
        assert!(matches!(
            bad.validate(),
            Err(FeedbackError::NoSuggestion { index: 1 })
        ));
        let mut bad = ok.clone();
        bad.feedback[0].outcome_timestamp = "yesterday".into();
        assert!(matches!(
            bad.validate(),
            Err(FeedbackError::Timestamp { index: 0 })
        ));
        // An override reason's code, system or display is stored: each at most 256
        // characters (a 7 MiB code was stored whole).
        for field in ["code", "system", "display"] {
            let mut bad = ok.clone();
            let reason = bad.feedback[0]
                .override_reason
                .as_mut()
                .unwrap()
                .reason
                .as_mut()
                .unwrap();
            let long = Some("x".repeat(MAX_CODING_CHARS + 1));
            match field {
                "code" => reason.code = long,
                "system" => reason.system = long,
                _ => reason.display = long,
            }
            assert!(
                matches!(bad.validate(), Err(FeedbackError::Coding { index: 0, .. })),
                "{field}"
            );
        }
        let mut bad = ok;
        bad.feedback[0].card = "not-a-uuid".into();
        assert!(matches!(
            bad.validate(),
            Err(FeedbackError::Card { index: 0 })
        ));
        assert!(
            serde_json::from_value::<FeedbackRequest>(json!({"feedback": [
                {"card": "9368d37b-283f-44a0-93ea-547cebab93ed", "outcome": "ignored",
                 "outcomeTimestamp": "2020-12-11T00:00:00Z"}]}))
            .is_err()
        );
    }
}
