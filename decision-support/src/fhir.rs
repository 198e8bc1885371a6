//! A hand-written serde subset of FHIR R4: the few resources and fields a CDS service reads.
//!
//! Why not a FHIR crate: `fhirbolt` 0.4 is the only Rust crate with R4 models, calls itself
//! experimental, and takes ~80 s and ~2.8 GB of memory to `cargo check` (measured in the
//! project's TESTBED.md); `fhir-sdk` has no R4 at all. A CDS service reads a handful of
//! elements of four resources, so a subset it can audit line by line costs less than a
//! generated model of the whole specification.
//!
//! What is read:
//! - [`Patient`]: `id`, `birthDate`, `gender`, `identifier`;
//! - [`Observation`]: `id`, `status`, `category`, `code`, `subject`, `effectiveDateTime` /
//!   `effectivePeriod` / `effectiveInstant`, `issued`, `valueQuantity`,
//!   `valueCodeableConcept`, `dataAbsentReason`, `component[]`;
//! - [`Condition`]: `id`, `code`, `clinicalStatus`, `verificationStatus`, `subject`;
//! - [`Encounter`]: `id`, `status`, `class`, `subject`;
//! - [`Bundle`]: `type`, `total`, `link[].relation` (only whether one is `next`),
//!   `entry[].fullUrl`, `entry[].resource`, `entry[].search.mode` (only whether it is
//!   `match`), an OperationOutcome entry's `issue[].severity` and `issue[].code`. A search
//!   page that is not the whole result ([`Bundle::is_complete`]) is
//!   remembered by [`Resources`] ([`Resources::is_complete`]), so that "no such Condition
//!   was found" is never read from one page of a longer search.
//!
//! Rules (lenient on input, as the CDS Hooks specification asks of services):
//! - unknown fields are ignored;
//! - resources of other types are kept as [`Resource::Other`] (their type name only) and
//!   skipped by [`Resources`];
//! - the input is bounded: [`Limits::max_bytes`] before parsing, serde_json's recursion limit
//!   (128 levels) stays on, [`Limits::max_resources`] resources at most, Bundles nested
//!   [`MAX_BUNDLE_DEPTH`] deep at most;
//! - dates are kept as written and parsed when read ([`Observation::effective`],
//!   [`Patient::birth_date`]), so one malformed date on an unrelated resource does not
//!   reject the whole prefetch; a malformed *structure* (a string where an object belongs)
//!   is an error naming where it is, never the value (errors carry no patient data).

use std::collections::{BTreeSet, HashMap};
use std::fmt;

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, Utc};
use serde::Deserialize;
use serde_json::Value;

/// The code system URI of LOINC.
pub const LOINC: &str = "http://loinc.org";
/// The code system URI of SNOMED CT.
pub const SNOMED: &str = "http://snomed.info/sct";
/// The code system URI of UCUM (units).
pub const UCUM: &str = "http://unitsofmeasure.org";

/// How deep Bundles may nest inside Bundles.
pub const MAX_BUNDLE_DEPTH: usize = 4;

/// Bounds on FHIR input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest input accepted, in bytes (default 4 MiB).
    pub max_bytes: usize,
    /// The most resources accepted, Bundles and their entries counted (default 10,000).
    pub max_resources: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 4 << 20,
            max_resources: 10_000,
        }
    }
}

/// Why FHIR input was refused. No variant carries a value read from the input other than
/// its shape (a field name, a resource type truncated to 64 characters, a position).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FhirError {
    /// The input is over [`Limits::max_bytes`].
    #[error("the FHIR input is {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    /// The input is not JSON (or nests deeper than serde_json's recursion limit).
    #[error("the FHIR input is not valid JSON ({category} at line {line}, column {column})")]
    Json {
        category: &'static str,
        line: usize,
        column: usize,
    },
    /// An object of the input names a key twice ([`crate::json`]): which value is meant
    /// cannot be told.
    #[error("the FHIR input is refused: {0}")]
    RepeatedKey(crate::json::JsonError),
    /// A JSON value where a resource belongs is not an object with a `resourceType` string.
    #[error("{path}: not a FHIR resource (no \"resourceType\")")]
    NotAResource { path: String },
    /// A resource of a type this crate reads does not have the structure FHIR R4 gives it.
    #[error("{path}: invalid {resource_type}: {reason}")]
    InvalidResource {
        path: String,
        resource_type: &'static str,
        reason: String,
    },
    /// More than [`Limits::max_resources`] resources.
    #[error("more than {limit} FHIR resources")]
    TooManyResources { limit: usize },
    /// Bundles nested deeper than [`MAX_BUNDLE_DEPTH`].
    #[error("{path}: Bundles nested more than {limit} deep")]
    TooDeep { path: String, limit: usize },
}

/// A FHIR resource of a type this crate reads, or the type name of one it skips.
#[derive(Clone, Debug, PartialEq)]
pub enum Resource {
    Patient(Box<Patient>),
    Observation(Box<Observation>),
    Condition(Box<Condition>),
    Encounter(Box<Encounter>),
    Bundle(Bundle),
    /// Another resource type (its `resourceType`, at most 64 characters): skipped.
    Other(String),
    /// A Bundle entry of a type read here that its reader refused (a malformed field, a
    /// code outside its value set): what could be read of it. The rest of the Bundle is
    /// still read; what the entry may have said is in doubt ([`Resources::unreadable`]).
    Unreadable(Box<Unreadable>),
}

/// What could be read of a Bundle entry its reader refused.
#[derive(Clone, Debug, PartialEq)]
pub struct Unreadable {
    pub resource_type: &'static str,
    /// The entry's `code` and its components' codes (an Observation's), when they could be
    /// read; `None` when not: it may be of any code.
    pub codes: Option<Vec<CodeableConcept>>,
    /// Its `effectiveDateTime` or `effectiveInstant` (with a zone), when it could be read.
    pub time: Option<DateTime<Utc>>,
    /// Not an entry but a whole search that was asked for and could not be read (the FHIR
    /// server failed, timed out, or answered what is not FHIR): anything it would have held
    /// is in doubt ([`Unreadable::search`]).
    pub search: bool,
}

impl Unreadable {
    /// What can be read of `value`, an entry of `resource_type` whose reader refused it.
    fn of(value: &Value, resource_type: &'static str) -> Unreadable {
        let concept = |v: Option<&Value>| -> Option<CodeableConcept> {
            v.and_then(|v| CodeableConcept::deserialize(v).ok())
        };
        let codes = (|| {
            let mut codes = vec![concept(value.get("code"))?];
            if let Some(components) = value.get("component") {
                for c in components.as_array()? {
                    codes.push(concept(c.get("code"))?);
                }
            }
            Some(codes)
        })();
        let time = ["effectiveDateTime", "effectiveInstant"]
            .iter()
            .find_map(|k| value.get(*k).and_then(Value::as_str))
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc));
        Unreadable {
            resource_type,
            codes,
            time,
            search: false,
        }
    }

    /// A search of `resource_type` (of these codes: `None`, any) that was asked for and
    /// could not be read.
    pub fn search(resource_type: &'static str, codes: Option<Vec<CodeableConcept>>) -> Unreadable {
        Unreadable {
            resource_type,
            codes,
            time: None,
            search: true,
        }
    }

    /// The same, as one entry rather than a whole search.
    fn not_a_search(self) -> Unreadable {
        Unreadable {
            search: false,
            ..self
        }
    }

    /// Whether this entry may be an Observation of `(system, code)` (as its code or a
    /// component's).
    pub fn may_have_code(&self, system: &str, code: &str) -> bool {
        self.codes
            .as_ref()
            .is_none_or(|codes| codes.iter().any(|c| c.has(system, code)))
    }
}

impl Resource {
    /// Parses one resource (a Bundle included) from JSON bytes.
    pub fn from_json(bytes: &[u8], limits: &Limits) -> Result<Resource, FhirError> {
        if bytes.len() > limits.max_bytes {
            return Err(FhirError::TooLarge {
                size: bytes.len(),
                limit: limits.max_bytes,
            });
        }
        let value: Value = serde_json::from_slice(bytes).map_err(|e| FhirError::Json {
            category: match e.classify() {
                serde_json::error::Category::Io => "read error",
                serde_json::error::Category::Syntax => "syntax error",
                serde_json::error::Category::Data => "data error",
                serde_json::error::Category::Eof => "unexpected end",
            },
            line: e.line(),
            column: e.column(),
        })?;
        crate::json::check(bytes).map_err(FhirError::RepeatedKey)?;
        Resource::from_value(&value, limits)
    }

    /// Reads one resource from an already parsed JSON value (a CDS Hooks prefetch entry).
    /// The byte bound is the caller's (the HTTP body limit); the resource count is checked.
    pub fn from_value(value: &Value, limits: &Limits) -> Result<Resource, FhirError> {
        let mut count = 0;
        read_resource(value, "$", 0, limits, &mut count)
    }

    /// The `resourceType` of this resource.
    pub fn resource_type(&self) -> &str {
        match self {
            Resource::Patient(_) => "Patient",
            Resource::Observation(_) => "Observation",
            Resource::Condition(_) => "Condition",
            Resource::Encounter(_) => "Encounter",
            Resource::Bundle(_) => "Bundle",
            Resource::Other(t) => t,
            Resource::Unreadable(u) => u.resource_type,
        }
    }
}

fn read_resource(
    value: &Value,
    path: &str,
    depth: usize,
    limits: &Limits,
    count: &mut usize,
) -> Result<Resource, FhirError> {
    *count += 1;
    if *count > limits.max_resources {
        return Err(FhirError::TooManyResources {
            limit: limits.max_resources,
        });
    }
    let kind = value
        .get("resourceType")
        .and_then(Value::as_str)
        .ok_or_else(|| FhirError::NotAResource {
            path: path.to_owned(),
        })?;
    fn typed<'a, T: Deserialize<'a>>(
        value: &'a Value,
        path: &str,
        resource_type: &'static str,
    ) -> Result<T, FhirError> {
        T::deserialize(value).map_err(|e| FhirError::InvalidResource {
            path: path.to_owned(),
            resource_type,
            reason: sanitise(&e.to_string()),
        })
    }
    Ok(match kind {
        "Patient" => Resource::Patient(Box::new(typed(value, path, "Patient")?)),
        "Observation" => Resource::Observation(Box::new(typed(value, path, "Observation")?)),
        "Condition" => Resource::Condition(Box::new(typed(value, path, "Condition")?)),
        "Encounter" => Resource::Encounter(Box::new(typed(value, path, "Encounter")?)),
        "Bundle" => {
            if depth >= MAX_BUNDLE_DEPTH {
                return Err(FhirError::TooDeep {
                    path: path.to_owned(),
                    limit: MAX_BUNDLE_DEPTH,
                });
            }
            let raw: RawBundle = typed(value, path, "Bundle")?;
            let mut entry = Vec::with_capacity(raw.entry.len());
            for (i, e) in raw.entry.iter().enumerate() {
                let resource = match &e.resource {
                    None | Some(Value::Null) => None,
                    Some(v) => match read_resource(
                        v,
                        &format!("{path}.entry[{i}].resource"),
                        depth + 1,
                        limits,
                        count,
                    ) {
                        Ok(r) => Some(r),
                        // One malformed entry (a lab result with a value written as a
                        // string) does not make the whole call a 400: what could be read
                        // of it is kept, and what it may have said is in doubt.
                        Err(FhirError::InvalidResource { resource_type, .. })
                            if resource_type != "Bundle" =>
                        {
                            Some(Resource::Unreadable(Box::new(Unreadable::of(
                                v,
                                resource_type,
                            ))))
                        }
                        Err(e) => return Err(e),
                    },
                };
                // A response whose status is not 2xx (a batch's failed search), or an
                // OperationOutcome with an error: that part of the answer is missing.
                let failed = e
                    .response
                    .as_ref()
                    .and_then(|r| r.status.as_deref())
                    .is_some_and(|s| !s.trim_start().starts_with('2'))
                    || e.resource.as_ref().is_some_and(is_error_outcome);
                let outcome = e.resource.as_ref().is_some_and(is_outcome);
                let mode = e.search.as_ref().and_then(|s| s.mode.as_deref());
                entry.push(BundleEntry {
                    said_match: !outcome && mode == Some("match"),
                    full_url: e.full_url.clone(),
                    failed,
                    partial: e.resource.as_ref().is_some_and(is_partial_outcome),
                    resource,
                    // An OperationOutcome is the search's outcome whatever its mode says (one
                    // without a mode counted as a match against `total`).
                    matched: !outcome
                        && e.search
                            .as_ref()
                            .and_then(|s| s.mode.as_deref())
                            .is_none_or(|m| m == "match"),
                });
            }
            Resource::Bundle(Bundle {
                id: raw.id,
                bundle_type: raw.bundle_type,
                total: raw.total,
                has_next: raw
                    .link
                    .iter()
                    .any(|l| l.relation.as_deref().is_some_and(is_next)),
                entry,
            })
        }
        other => Resource::Other(other.chars().take(64).collect()),
    })
}

/// Whether a Bundle link's `relation` is `next` (FHIR paging): relation types compare without
/// regard to case (RFC 8288), surrounding blanks ignored.
pub fn is_next(relation: &str) -> bool {
    relation.trim().eq_ignore_ascii_case("next")
}

/// serde's messages may quote the offending value ("invalid type: string \"…\""): keep the
/// shape of the complaint, never the value.
pub fn sanitise(message: &str) -> String {
    // serde_json::Value errors carry no position; strip one if present anyway.
    let message = message.split(" at line ").next().unwrap_or(message);
    if message.starts_with("missing field") || message.starts_with("duplicate field") {
        return message.to_owned();
    }
    for prefix in ["invalid type", "invalid value", "invalid length"] {
        if message.starts_with(prefix) {
            return match message.find(", expected ") {
                Some(at) => format!("{prefix}{}", &message[at..]),
                None => prefix.to_owned(),
            };
        }
    }
    if message.starts_with("unknown variant") {
        return match message.find(", expected ") {
            Some(at) => format!("unknown code{}", &message[at..]),
            None => "unknown code".to_owned(),
        };
    }
    "malformed".to_owned()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBundle {
    id: Option<String>,
    #[serde(rename = "type")]
    bundle_type: Option<String>,
    /// `unsignedInt`: a negative, fractional or non-numeric total is a malformed Bundle.
    total: Option<u64>,
    #[serde(default)]
    link: Vec<RawLink>,
    #[serde(default)]
    entry: Vec<RawEntry>,
}

/// `Bundle.link`: only `relation` is read (the URL is never followed or kept here).
#[derive(Deserialize)]
struct RawLink {
    relation: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEntry {
    full_url: Option<String>,
    resource: Option<Value>,
    search: Option<RawSearch>,
    response: Option<RawResponse>,
}

/// `Bundle.entry.response`: only its `status` is read.
#[derive(Deserialize)]
struct RawResponse {
    status: Option<String>,
}

#[derive(Deserialize)]
struct RawSearch {
    mode: Option<String>,
}

/// A Bundle (a search result set, a collection…): its entries' resources.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Bundle {
    pub id: Option<String>,
    /// `Bundle.type` as written (`searchset`, `collection`, …).
    pub bundle_type: Option<String>,
    /// `Bundle.total`: how many resources match the search, over every page.
    pub total: Option<u64>,
    /// Whether `Bundle.link` has a `next` relation (more pages follow).
    pub has_next: bool,
    pub entry: Vec<BundleEntry>,
}

impl Bundle {
    /// The entries that are search matches ([`BundleEntry::matched`]) with a resource.
    pub fn matches(&self) -> usize {
        self.entry
            .iter()
            .filter(|e| e.matched && e.resource.is_some())
            .count()
    }

    /// Whether this Bundle holds the whole result, as far as it says: not when a `next`
    /// page follows, nor when `total` is more than its matches (the rest are on other
    /// pages, or were left out by the server). A Bundle that says neither (a `collection`,
    /// or a searchset without `total`) is taken as whole. Nested Bundles count: one that
    /// is not whole makes this one not whole either.
    pub fn is_complete(&self) -> bool {
        self.is_whole_page()
            && self.entry.iter().all(|e| match &e.resource {
                Some(Resource::Bundle(b)) => b.is_complete(),
                _ => true,
            })
    }
}

impl Bundle {
    /// [`Bundle::is_complete`] for this Bundle's own entries, nested Bundles aside: no `next`
    /// page, a `total` no more than its matches, no outcome saying results were left out
    /// ([`BundleEntry::partial`]: an `incomplete` warning was read as the whole result, a
    /// red-team finding), and no match without its resource (an entry of only a `fullUrl`
    /// holds what was not read).
    fn is_whole_page(&self) -> bool {
        // History and batch or transaction responses have entries without a resource by
        // design (a deletion, a request's status); a search's match never does.
        let entries_hold_resources = !matches!(
            self.bundle_type.as_deref(),
            Some("history" | "batch-response" | "transaction-response")
        );
        let match_without_resource = entries_hold_resources
            && self
                .entry
                .iter()
                .any(|e| e.matched && e.resource.is_none() && !e.failed);
        !self.has_next
            && self
                .total
                .is_none_or(|total| total <= self.matches() as u64)
            && !self.entry.iter().any(|e| e.partial)
            && !match_without_resource
    }

    /// Whether this Bundle's matches are resources of `resource_type` (an entry that could
    /// not be read counts as of its type): a search answered with resources of another type
    /// (Observations under a Condition search) is a broken answer, not "none found" (a
    /// red-team finding). An entry of another type whose `search.mode` is absent is taken
    /// as included (a server that leaves out `include` on its `_include`d Patient) when the
    /// page holds resources of the searched type, or nothing else: such entries made a whole
    /// search "not answered" (a re-attack's finding); one that says `match` never is.
    pub fn matches_only(&self, resource_type: &str) -> bool {
        let (mut of_type, mut unmarked_other) = (false, false);
        for e in self.entry.iter().filter(|e| e.matched) {
            match &e.resource {
                None => {}
                Some(r) if r.resource_type() == resource_type => of_type = true,
                Some(_) if e.said_match => return false,
                Some(_) => unmarked_other = true,
            }
        }
        of_type || !unmarked_other
    }
}

/// One `Bundle.entry`.
#[derive(Clone, Debug, PartialEq)]
pub struct BundleEntry {
    pub full_url: Option<String>,
    /// `None` when the entry has no resource (e.g. a search outcome without one).
    pub resource: Option<Resource>,
    /// Whether the entry is a search match: `search.mode` is `match` or absent (not
    /// `include`, a resource added by `_include`, nor `outcome`). `Bundle.total` counts
    /// matches only.
    pub matched: bool,
    /// `search.mode` says `match` (not absent): a resource of another type than the search's
    /// that says so makes the answer a broken one ([`Bundle::matches_only`]).
    pub said_match: bool,
    /// The entry reports a failure: a `response.status` that is not 2xx, or an
    /// OperationOutcome with an issue of severity `error` or `fatal` (a search's outcome
    /// entry, a batch's failed request).
    pub failed: bool,
    /// The entry is an OperationOutcome with an issue, of any severity, whose code says the
    /// result may lack resources that match: `incomplete`, `suppressed` or `too-costly`
    /// (FHIR R4 IssueType). The Bundle is then not the whole result
    /// ([`Bundle::is_complete`]).
    pub partial: bool,
}

impl Bundle {
    /// Whether this Bundle is a search's answer read without error: a `searchset` with no
    /// failed entry ([`BundleEntry::failed`]). A batch or transaction response, a
    /// collection, or a search that reports an error is no such answer (CDS Hooks
    /// prefetch).
    pub fn is_search_answer(&self) -> bool {
        self.bundle_type.as_deref() == Some("searchset") && !self.entry.iter().any(|e| e.failed)
    }
}

/// Whether `value` is an OperationOutcome.
fn is_outcome(value: &Value) -> bool {
    value.get("resourceType").and_then(Value::as_str) == Some("OperationOutcome")
}

/// Whether `value` is an OperationOutcome with an issue of which `issue` holds.
fn has_outcome_issue(value: &Value, issue: impl Fn(&Value) -> bool) -> bool {
    is_outcome(value)
        && value
            .get("issue")
            .and_then(Value::as_array)
            .is_some_and(|issues| issues.iter().any(issue))
}

/// Whether `value` is an OperationOutcome with an issue, of any severity (a `warning`
/// included), whose code says matching resources may have been left out (FHIR R4
/// IssueType): `incomplete` (not all the data matching the criteria was returned),
/// `suppressed` (withheld by business rules or security) or `too-costly` (the server
/// stopped short).
fn is_partial_outcome(value: &Value) -> bool {
    has_outcome_issue(value, |i| {
        matches!(
            i.get("code").and_then(Value::as_str).map(str::trim),
            Some("incomplete" | "suppressed" | "too-costly")
        )
    })
}

/// Whether `value` is an OperationOutcome with an issue of severity `error` or `fatal`.
fn is_error_outcome(value: &Value) -> bool {
    has_outcome_issue(value, |i| {
        matches!(
            i.get("severity").and_then(Value::as_str),
            Some("error" | "fatal")
        )
    })
}

/// The resources of one or more inputs, Bundles flattened, by type.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    pub patients: Vec<Patient>,
    pub observations: Vec<Observation>,
    pub conditions: Vec<Condition>,
    pub encounters: Vec<Encounter>,
    /// How many resources of other types were skipped.
    pub skipped: usize,
    /// The resource types (of those above) of which a Bundle that was not the whole
    /// result ([`Bundle::is_complete`]) was added: of these, what is absent may exist.
    pub incomplete: BTreeSet<&'static str>,
    /// The resource types a call searched for and got no answer of (not prefetched, the
    /// fetch failed, an OperationOutcome in the Bundle's place): [`Resources::mark_unread`].
    pub unread: BTreeSet<&'static str>,
    /// Bundle entries of the types above that their reader refused ([`Resource::Unreadable`]).
    pub unreadable: Vec<Unreadable>,
    /// For each Bundle added that was not the whole result and may have held Observations
    /// (see [`Resources::observations_unread_after`]).
    pub partial_observations: Vec<PartialSearch>,
    /// The FHIR server the resources come from ([`Resources::of_server`]).
    server: Option<String>,
    /// Where the first resource of each id is, by type ([`add_version`]).
    patient_ids: HashMap<String, Vec<usize>>,
    observation_ids: HashMap<String, Vec<usize>>,
    condition_ids: HashMap<String, Vec<usize>>,
    encounter_ids: HashMap<String, Vec<usize>>,
    /// The type of the search whose answer is being added ([`Resources::add_search_answer`]).
    searching: Option<&'static str>,
}

/// A resource that may come more than once (prefetched and fetched, on two pages), in
/// versions ([`Meta`]).
trait Versioned {
    fn id(&self) -> Option<&str>;
    fn meta(&self) -> Option<&Meta>;
    /// When this version was issued, where the resource says (an Observation's `issued`).
    fn issued(&self) -> Option<DateTime<Utc>> {
        None
    }
    /// Whether this version says the record was made in error.
    fn entered_in_error(&self) -> bool;
}

impl Versioned for Patient {
    fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }
    fn meta(&self) -> Option<&Meta> {
        self.meta.as_ref()
    }
    fn entered_in_error(&self) -> bool {
        false
    }
}

impl Versioned for Observation {
    fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }
    fn meta(&self) -> Option<&Meta> {
        self.meta.as_ref()
    }
    fn issued(&self) -> Option<DateTime<Utc>> {
        Observation::issued(self)
    }
    fn entered_in_error(&self) -> bool {
        self.status == ObservationStatus::EnteredInError
    }
}

impl Versioned for Condition {
    fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }
    fn meta(&self) -> Option<&Meta> {
        self.meta.as_ref()
    }
    fn entered_in_error(&self) -> bool {
        self.verification_status.as_ref().is_some_and(|c| {
            condition_status_code(c, CONDITION_VER_STATUS, CONDITION_VER_STATUS_STU3)
                .contains(&"entered-in-error")
        })
    }
}

impl Versioned for Encounter {
    fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }
    fn meta(&self) -> Option<&Meta> {
        self.meta.as_ref()
    }
    fn entered_in_error(&self) -> bool {
        self.status.as_deref() == Some("entered-in-error")
    }
}

/// Which of two versions of one resource is the newer: by `meta.versionId` where both are
/// whole numbers, else by `meta.lastUpdated`, else by when each was issued; `None` when
/// they cannot be told apart.
fn newer_version<T: Versioned>(a: &T, b: &T) -> Option<std::cmp::Ordering> {
    use std::cmp::Ordering;
    let number = |r: &T| {
        r.meta()
            .and_then(|m| m.version_id.as_deref())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let updated = |r: &T| {
        r.meta()
            .and_then(|m| m.last_updated.as_deref())
            .and_then(|t| match FhirDateTime::parse(t) {
                Ok(FhirDateTime::Instant(t)) => Some(t.with_timezone(&Utc)),
                _ => None,
            })
    };
    let tell = |x: Option<Ordering>| x.filter(|o| o.is_ne());
    tell(number(a).zip(number(b)).map(|(x, y)| x.cmp(&y)))
        .or_else(|| tell(updated(a).zip(updated(b)).map(|(x, y)| x.cmp(&y))))
        .or_else(|| tell(a.issued().zip(b.issued()).map(|(x, y)| x.cmp(&y))))
}

/// Adds `resource` to `list`, one version per id: a newer version of a resource already
/// there replaces it, an older one is dropped (the same SBP of 60 retracted on a later page
/// as `entered-in-error` was still scored from its first copy: a red-team finding). Where
/// the order cannot be told, a version saying the record was made in error wins (it is
/// the end of a record's life), and otherwise both are kept (their values are then weighed
/// as two readings; [`Resources::disputed`]). A copy is weighed against every copy kept
/// of its id (a third copy, retracted, replaced only the first of two: a red-team finding).
///
/// At most [`MAX_COPIES`] copies of one id are kept: a copy that would be one more is
/// given back (`Err`) for the caller to count as an entry that could not be read (weighed
/// against every copy kept, 10,000 copies of one id took 388 s of CPU: a red-team finding).
fn add_version<T: Versioned + PartialEq>(
    list: &mut Vec<T>,
    ids: &mut HashMap<String, Vec<usize>>,
    resource: T,
) -> Result<(), T> {
    use std::cmp::Ordering;
    let Some(id) = resource.id().map(str::to_owned) else {
        list.push(resource);
        return Ok(());
    };
    let Some(kept) = ids.get(&id) else {
        ids.insert(id, vec![list.len()]);
        list.push(resource);
        return Ok(());
    };
    if kept.iter().any(|&at| list[at] == resource) {
        return Ok(());
    }
    let orders: Vec<Option<Ordering>> = kept
        .iter()
        .map(|&at| newer_version(&resource, &list[at]))
        .collect();
    let replaces_all = orders.iter().all(|o| *o == Some(Ordering::Greater))
        || (resource.entered_in_error() && orders.iter().all(|o| *o != Some(Ordering::Less)));
    if replaces_all {
        let first = kept[0];
        let rest: Vec<usize> = kept[1..].to_vec();
        list[first] = resource;
        if !rest.is_empty() {
            // Rare (several copies whose order was unknown): drop the others and index
            // the list again.
            let mut i = 0;
            list.retain(|_| {
                let keep = !rest.contains(&i);
                i += 1;
                keep
            });
            ids.clear();
            for (at, r) in list.iter().enumerate() {
                if let Some(id) = r.id() {
                    ids.entry(id.to_owned()).or_default().push(at);
                }
            }
        }
        return Ok(());
    }
    let older_than_one = orders
        .iter()
        .any(|o| matches!(o, Some(Ordering::Less | Ordering::Equal)));
    let retracted = kept.iter().any(|&at| list[at].entered_in_error());
    if older_than_one || retracted {
        return Ok(());
    }
    if kept.len() >= MAX_COPIES {
        return Err(resource);
    }
    ids.get_mut(&id).expect("just read").push(list.len());
    list.push(resource);
    Ok(())
}

/// The most copies of one resource id whose order cannot be told that are kept (and weighed
/// as readings); a server sends one copy of a resource, or a few across pages and searches.
pub const MAX_COPIES: usize = 16;

/// `meta` as far as it orders versions: one that is not an object, or whose `versionId` is
/// a number, is read as best it can be and never refuses the resource (a `"versionId": 2`
/// made a whole prefetch 400 and a vital sign unreadable: a red-team finding).
fn lenient_meta<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Meta>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    let Some(o) = v.as_object() else {
        return Ok(None);
    };
    let text = |key: &str| match o.get(key) {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    Ok(Some(Meta {
        version_id: text("versionId"),
        last_updated: match o.get("lastUpdated") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            _ => None,
        },
    }))
}

/// `Resource.meta`: the version of a resource.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    pub version_id: Option<String>,
    pub last_updated: Option<String>,
}

/// An Observation search read in part.
#[derive(Clone, Debug, PartialEq)]
pub struct PartialSearch {
    /// The effective time of its last Observation when its Observations come newest first
    /// (as a `_sort=-date` search returns them), `None` when they do not (or one is
    /// undated).
    pub reach: Option<DateTime<Utc>>,
    /// The codes it searched (`code=`), `None` when not by code (a category, or not known):
    /// what it did not read can only be of these ([`Resources::add_searched`]).
    pub codes: Option<Vec<CodeableConcept>>,
}

impl Resources {
    /// An empty set.
    pub fn new() -> Resources {
        Resources::default()
    }

    /// An empty set of resources read from the FHIR server at `base` (the CDS request's
    /// `fhirServer`): a subject given as an absolute URL on another server is not a
    /// reference to the patient of this call, whatever id it ends with
    /// ([`Resources::add_searched`]).
    pub fn of_server(base: Option<&str>) -> Resources {
        Resources {
            server: base.map(|b| b.trim_end_matches('/').to_owned()),
            ..Resources::default()
        }
    }

    /// A subject as this call reads it: an absolute URL on this call's FHIR server is made
    /// relative; one on another server refers to nothing this call knows (another EHR's
    /// `Patient/p1` was taken as this patient's: a red-team finding).
    fn localise(&self, subject: &mut Option<Reference>) {
        let (Some(base), Some(Reference { reference: Some(r) })) = (&self.server, subject.as_mut())
        else {
            return;
        };
        let Some(reference) = UrlParts::of(r) else {
            // Not an absolute http(s) URL: relative (or a `urn:`), read as it is.
            if !r.contains("://") {
                return;
            }
            *subject = Some(Reference { reference: None });
            return;
        };
        // The same server whatever the case of its scheme and host, or a default port
        // written out (RFC 3986 6.2.2-6.2.3): `https://EHR.example/fhir/Patient/p1` is this
        // server's when `fhirServer` is `https://ehr.example/fhir` (compared as written, the
        // newest vitals were set aside as another patient's: a red-team finding).
        let local = UrlParts::of(base).and_then(|b| {
            (b.scheme == reference.scheme && b.host == reference.host && b.port == reference.port)
                .then(|| reference.path.strip_prefix(b.path.trim_end_matches('/')))
                .flatten()
                .and_then(|rest| rest.strip_prefix('/'))
                .map(str::to_owned)
        });
        match local {
            Some(relative) => *r = relative,
            None => *subject = Some(Reference { reference: None }),
        }
    }

    /// Whether copies of this Condition's id disagree on whether it holds and their order
    /// cannot be told (kept side by side by [`add_version`]): then it is neither present
    /// nor absent (an `active` and a `refuted` copy without versions scored infection "yes":
    /// a red-team finding).
    /// The other copies of `c` read (the same id, prefetched and fetched, on two pages).
    pub fn condition_copies<'a>(&'a self, c: &Condition) -> impl Iterator<Item = &'a Condition> {
        c.id.as_ref()
            .and_then(|id| self.condition_ids.get(id))
            .into_iter()
            .flatten()
            .filter_map(|&at| self.conditions.get(at))
    }

    pub fn condition_disputed(&self, c: &Condition) -> bool {
        let Some(copies) = c.id.as_ref().and_then(|id| self.condition_ids.get(id)) else {
            return false;
        };
        let activity = c.activity();
        copies
            .iter()
            .filter_map(|&at| self.conditions.get(at))
            .any(|other| other.activity() != activity)
    }

    /// Adds a resource, flattening Bundles.
    pub fn add(&mut self, resource: Resource) {
        self.add_searched(resource, None);
    }

    /// [`Resources::add_searched`] for the answer of a search of `path` (`Condition`,
    /// `Observation`, …: the search's resource type): a page of it that names no matching
    /// entry leaves only that type in doubt.
    pub fn add_search_answer(
        &mut self,
        resource: Resource,
        path: &str,
        codes: Option<&[CodeableConcept]>,
    ) {
        let before = self.searching;
        self.searching = READ_TYPES.iter().copied().find(|t| *t == path);
        self.add_searched(resource, codes);
        self.searching = before;
    }

    /// Adds a resource that answered a search of Observations of `codes` (`None`: not by
    /// code): a Bundle of it read in part lacks only Observations of those codes (a
    /// consciousness search answered by one page of 10 made every vital sign older than
    /// its tenth value doubtful: a red-team finding).
    pub fn add_searched(&mut self, resource: Resource, codes: Option<&[CodeableConcept]>) {
        match resource {
            // A copy past [`MAX_COPIES`] of one id is not weighed: it is an entry that could
            // not be read (what it may say is in doubt), as the arm below.
            Resource::Patient(p) => {
                let p = *p;
                if add_version(&mut self.patients, &mut self.patient_ids, p).is_err() {
                    self.unreadable
                        .push(Unreadable::search("Patient", None).not_a_search());
                }
            }
            Resource::Observation(o) => {
                let mut o = *o;
                self.localise(&mut o.subject);
                if let Err(o) = add_version(&mut self.observations, &mut self.observation_ids, o) {
                    let mut codes = vec![o.code.clone()];
                    codes.extend(o.component.iter().map(|c| c.code.clone()));
                    self.unreadable
                        .push(Unreadable::search("Observation", Some(codes)).not_a_search());
                }
            }
            Resource::Condition(c) => {
                let mut c = *c;
                self.localise(&mut c.subject);
                if add_version(&mut self.conditions, &mut self.condition_ids, c).is_err() {
                    self.incomplete.insert("Condition");
                    self.unreadable
                        .push(Unreadable::search("Condition", None).not_a_search());
                }
            }
            Resource::Encounter(e) => {
                let mut e = *e;
                self.localise(&mut e.subject);
                if add_version(&mut self.encounters, &mut self.encounter_ids, e).is_err() {
                    self.incomplete.insert("Encounter");
                    self.unreadable
                        .push(Unreadable::search("Encounter", None).not_a_search());
                }
            }
            Resource::Bundle(b) => {
                // A nested Bundle that is not whole marks itself as it is added below.
                if !b.is_whole_page() {
                    self.mark_incomplete(&b, codes);
                }
                for e in b.entry {
                    if let Some(r) = e.resource {
                        self.add_searched(r, codes);
                    }
                }
            }
            Resource::Other(_) => self.skipped += 1,
            Resource::Unreadable(u) => {
                // A Condition or Encounter that cannot be read may be the one that matters:
                // those read are then not all of them.
                if matches!(u.resource_type, "Condition" | "Encounter") {
                    self.incomplete.insert(u.resource_type);
                }
                self.unreadable.push(*u);
            }
        }
    }

    /// Records the types a partial Bundle was a search of: those of its matches, or every
    /// type read here when it has no match of one of them (a page with no entries, or of
    /// another type, says nothing about which search it was: assume the worst).
    fn mark_incomplete(&mut self, b: &Bundle, codes: Option<&[CodeableConcept]>) {
        let mut types: BTreeSet<&'static str> = b
            .entry
            .iter()
            .filter(|e| e.matched)
            .filter_map(|e| match &e.resource {
                Some(Resource::Patient(_)) => Some("Patient"),
                Some(Resource::Observation(_)) => Some("Observation"),
                Some(Resource::Condition(_)) => Some("Condition"),
                Some(Resource::Encounter(_)) => Some("Encounter"),
                _ => None,
            })
            .collect();
        // No entry tells what was searched for: the search's own type where the caller
        // said it, else every type (an empty page of a Condition search cast doubt on every
        // vital sign: a red-team finding).
        if types.is_empty() {
            types = match self.searching {
                Some(t) => BTreeSet::from([t]),
                None => BTreeSet::from(READ_TYPES),
            };
        }
        if types.contains("Observation") {
            self.partial_observations.push(PartialSearch {
                reach: newest_first_reach(b),
                codes: codes.map(<[CodeableConcept]>::to_vec),
            });
        }
        self.incomplete.extend(types);
    }

    /// Records that a search of `resource_type` the call needed got no answer: what is
    /// absent may exist (a pregnancy among the Conditions not read).
    pub fn mark_unread(&mut self, resource_type: &'static str) {
        self.unread.insert(resource_type);
    }

    /// Records a search that was asked for and could not be read: an Observation search
    /// makes every parameter or feature it may hold unknown (an older value found
    /// elsewhere is not the latest: a consciousness search that failed let an older
    /// "Alert" from the vitals be scored, a red-team finding); a search of another type
    /// marks its type unread ([`Resources::mark_unread`]).
    pub fn add_unread_search(&mut self, search: Unreadable) {
        match search.resource_type {
            "Observation" => self.unreadable.push(search),
            "Condition" => self.mark_unread("Condition"),
            "Encounter" => self.mark_unread("Encounter"),
            _ => {}
        }
    }

    /// Whether a search of `resource_type` the call needed got no answer
    /// ([`Resources::mark_unread`]).
    pub fn is_unread(&self, resource_type: &str) -> bool {
        self.unread.contains(resource_type)
    }

    /// Whether an Observation dated `t` or later may be on a page not read: a partial
    /// search whose Observations came newest first holds the newest of its results (what it
    /// lacks is no newer than its last, but may be as new: a set charted at one time split
    /// across pages); one whose Observations did not come in that order (the server ignored
    /// `_sort`) or were not all dated says nothing about what it lacks. A value dated `t` is
    /// then not known to be the latest (at one time, oxygen wins over air: the flow on the
    /// next page changes the score).
    ///
    /// `may_hold` says whether a search of these codes (`None`: not by code) may hold the
    /// value asked about; searches that cannot are not counted.
    pub fn observations_unread_after(
        &self,
        t: DateTime<Utc>,
        may_hold: impl Fn(Option<&[CodeableConcept]>) -> bool,
    ) -> bool {
        self.partial_observations
            .iter()
            .filter(|p| may_hold(p.codes.as_deref()))
            .any(|p| p.reach.is_none_or(|last| last >= t))
    }

    /// Whether every Bundle added that held (or may have held) resources of `resource_type`
    /// was the whole result: when not, a resource absent here may exist on another page, so
    /// its absence must not be read as "none" (e.g. "no infection").
    pub fn is_complete(&self, resource_type: &str) -> bool {
        !self.incomplete.contains(resource_type)
    }
}

/// The effective time of a partial Bundle's last matched Observation when its matched
/// Observations are in newest-first order and all dated, and the page shows that order (two
/// times at least, the later first); `None` otherwise (none at all included: nothing says
/// what the rest holds). A page of one time, or of one entry, may be the first page of a
/// search sorted oldest first, whose newest values are on the pages not read (taken as
/// newest first, a parameter it did not hold read as "no value recorded": a re-attack's
/// finding).
fn newest_first_reach(b: &Bundle) -> Option<DateTime<Utc>> {
    // A server that says it left results out (`suppressed`: withheld for privacy; any
    // `incomplete`) may have left out the newest: nothing says the rest is older (a
    // re-attack: a risk card scored from the values around a withheld one).
    if b.entry.iter().any(|e| e.partial) {
        return None;
    }
    // What is not read is no newer than the last read is; of a date without a time, no
    // later than the end of that date in any zone.
    let mut last: Option<TimeBounds> = None;
    let mut descended = false;
    for e in b.entry.iter().filter(|e| e.matched) {
        if let Some(Resource::Observation(o)) = &e.resource {
            let bounds = o.time_bounds();
            let (Some(earliest), Some(latest)) = (bounds.earliest(), bounds.latest()) else {
                return None;
            };
            if let Some(previous) = last {
                if previous.latest().is_some_and(|l| earliest > l) {
                    return None;
                }
                descended |= previous.earliest().is_some_and(|e| latest < e);
            }
            last = Some(bounds);
        }
    }
    if !descended {
        return None;
    }
    last.and_then(TimeBounds::latest)
}

/// The resource types [`Resources`] keeps.
const READ_TYPES: [&str; 4] = ["Patient", "Observation", "Condition", "Encounter"];

impl From<Resource> for Resources {
    fn from(resource: Resource) -> Self {
        let mut all = Resources::new();
        all.add(resource);
        all
    }
}

/// A `Coding` (also written in cards: a source topic, an override reason).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Coding {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display: Option<String>,
}

impl Coding {
    /// Whether this is `code` of `system` (both compared exactly, as FHIR codes are; a
    /// system's OID form is the same system: [`canonical_system`]).
    pub fn is(&self, system: &str, code: &str) -> bool {
        self.system
            .as_deref()
            .is_some_and(|s| canonical_system(s) == canonical_system(system))
            && self.code.as_deref() == Some(code)
    }
}

/// A code system's canonical URI: SNOMED CT's and LOINC's OIDs as `urn:oid:` (as HL7 v2
/// and CDA feeds write them) are [`SNOMED`] and [`LOINC`] (a Condition coded
/// `urn:oid:2.16.840.1.113883.6.96` was not matched: a red-team finding); any other system
/// as written.
pub fn canonical_system(system: &str) -> &str {
    let oid = system
        .get(..8)
        .filter(|p| p.eq_ignore_ascii_case("urn:oid:"))
        .map(|_| &system[8..]);
    match oid {
        Some("2.16.840.1.113883.6.96") => SNOMED,
        Some("2.16.840.1.113883.6.1") => LOINC,
        _ => system,
    }
}

/// A `CodeableConcept`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CodeableConcept {
    #[serde(default)]
    pub coding: Vec<Coding>,
    pub text: Option<String>,
}

impl CodeableConcept {
    /// One coding: `code` of `system`.
    pub fn of(system: &str, code: &str) -> CodeableConcept {
        CodeableConcept {
            coding: vec![Coding {
                system: Some(system.to_owned()),
                code: Some(code.to_owned()),
                display: None,
            }],
            text: None,
        }
    }

    /// Whether any coding is `code` of `system`.
    pub fn has(&self, system: &str, code: &str) -> bool {
        self.coding.iter().any(|c| c.is(system, code))
    }

    /// Whether any coding is one of `codes` (system, code).
    pub fn has_any(&self, codes: &[SystemCode]) -> bool {
        codes.iter().any(|c| self.has(&c.system, &c.code))
    }

    /// The first coding of `system`, if any.
    pub fn code_in(&self, system: &str) -> Option<&str> {
        self.coding
            .iter()
            .find(|c| {
                c.system
                    .as_deref()
                    .is_some_and(|s| canonical_system(s) == canonical_system(system))
            })
            .and_then(|c| c.code.as_deref())
    }

    /// Whether a coding gives a code in one of `systems` ([`canonical_system`]s): when not
    /// (no coding, text only, only other systems' codes), whether it is one of those
    /// systems' codes cannot be told.
    pub fn has_code_in(&self, systems: &[&str]) -> bool {
        self.coding.iter().any(|c| {
            c.code.as_deref().is_some_and(|k| !k.trim().is_empty())
                && c.system
                    .as_deref()
                    .is_some_and(|s| systems.contains(&canonical_system(s)))
        })
    }
}

/// A code with its system, written `system|code` in configuration (as FHIR search does).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SystemCode {
    pub system: String,
    pub code: String,
}

impl SystemCode {
    /// `system` and `code`.
    pub fn new(system: &str, code: &str) -> SystemCode {
        SystemCode {
            system: system.to_owned(),
            code: code.to_owned(),
        }
    }

    /// Parses `system|code` (both non-empty).
    pub fn parse(text: &str) -> Option<SystemCode> {
        let (system, code) = text.split_once('|')?;
        (!system.is_empty() && !code.is_empty() && !code.contains('|'))
            .then(|| SystemCode::new(system, code))
    }
}

impl fmt::Display for SystemCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}|{}", self.system, self.code)
    }
}

impl<'de> Deserialize<'de> for SystemCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        SystemCode::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(
                "expected \"system|code\", e.g. \"http://snomed.info/sct|77386006\"",
            )
        })
    }
}

impl serde::Serialize for SystemCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A `Quantity`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Quantity {
    pub value: Option<f64>,
    /// `<`, `<=`, `>=`, `>`: the value is a bound, not a measurement.
    pub comparator: Option<String>,
    /// The human-readable unit.
    pub unit: Option<String>,
    pub system: Option<String>,
    /// The coded unit (UCUM when `system` is [`UCUM`]).
    pub code: Option<String>,
}

/// A `Reference` (only its literal reference).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reference {
    pub reference: Option<String>,
}

impl Reference {
    /// The id when this is a reference to a Patient: relative, exactly `Patient/{id}` (or
    /// `Patient/{id}/_history/{v}`; `Group/g/Patient/p1` is not one), `None` otherwise. An
    /// absolute URL is none: [`Resources::of_server`] makes the call's own FHIR server's
    /// URLs relative, and a call without one has no server of its own (an absolute URL
    /// ending in `/Patient/p1` names another organisation's `p1`: a red-team finding).
    pub fn patient_id(&self) -> Option<&str> {
        let r = self.reference.as_deref()?;
        let r = match r.split_once("/_history/") {
            Some((r, version)) if !version.is_empty() && !version.contains('/') => r,
            Some(_) => return None,
            None => r,
        };
        let (before, id) = r.rsplit_once('/')?;
        if id.is_empty() {
            return None;
        }
        (before == "Patient").then_some(id)
    }
}

/// An absolute http(s) URL's parts, as RFC 3986 compares them: scheme and host lower-cased,
/// the default port made explicit; the path as written.
#[derive(Debug, PartialEq, Eq)]
struct UrlParts<'a> {
    scheme: String,
    host: String,
    port: u16,
    path: &'a str,
}

impl<'a> UrlParts<'a> {
    fn of(url: &'a str) -> Option<UrlParts<'a>> {
        let (scheme, rest) = url.split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let default = match scheme.as_str() {
            "https" => 443,
            "http" => 80,
            _ => return None,
        };
        let (authority, path) = rest
            .find(['/', '?', '#'])
            .map_or((rest, ""), |i| rest.split_at(i));
        if authority.contains('@') || authority.is_empty() {
            return None;
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !authority.ends_with(']') => (
                h,
                if p.is_empty() {
                    default
                } else {
                    p.parse().ok()?
                },
            ),
            _ => (authority, default),
        };
        Some(UrlParts {
            scheme,
            host: host.to_ascii_lowercase(),
            port,
            path,
        })
    }
}

/// A `Period` (as written; parsed when read).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Period {
    pub start: Option<String>,
    pub end: Option<String>,
}

/// An `Identifier`. Its `Debug` hides the value (an NHS number is a patient identifier).
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identifier {
    pub system: Option<String>,
    pub value: Option<String>,
    /// `usual`, `official`, `temp`, `secondary`, `old`.
    #[serde(rename = "use")]
    pub use_: Option<String>,
    pub period: Option<Period>,
}

impl fmt::Debug for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identifier")
            .field("system", &self.system)
            .field("value", &self.value.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `Patient.gender`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Gender {
    Male,
    Female,
    Other,
    Unknown,
}

fn gender_or_absent<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Gender>, D::Error> {
    let code: Option<String> = Option::deserialize(d)?;
    Ok(code.and_then(|c| Gender::deserialize(serde_json::Value::String(c)).ok()))
}

/// A Patient.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Patient {
    pub id: Option<String>,
    #[serde(default, deserialize_with = "lenient_meta")]
    pub meta: Option<Meta>,
    /// As written: `YYYY`, `YYYY-MM` or `YYYY-MM-DD` (read with [`Patient::birth_date`]).
    pub birth_date: Option<String>,
    /// A code outside the value set (`"xyz"`) is read as absent: the gender is then missing
    /// where a model needs it, as when it is not given, instead of the whole call refused.
    #[serde(default, deserialize_with = "gender_or_absent")]
    pub gender: Option<Gender>,
    #[serde(default)]
    pub identifier: Vec<Identifier>,
    pub deceased_boolean: Option<bool>,
    pub deceased_date_time: Option<String>,
}

impl Patient {
    /// Whether the record says the patient has died (`deceasedBoolean: true`, or any
    /// `deceasedDateTime`).
    pub fn is_deceased(&self) -> bool {
        self.deceased_boolean == Some(true) || self.deceased_date_time.is_some()
    }

    /// `birthDate` parsed; `None` when absent, `Err` when malformed.
    pub fn birth_date(&self) -> Option<Result<FhirDate, DateError>> {
        self.birth_date.as_deref().map(FhirDate::parse)
    }

    /// The value of the first identifier of `system`.
    pub fn identifier_value(&self, system: &str) -> Option<&str> {
        self.identifier
            .iter()
            .find(|i| i.system.as_deref() == Some(system))
            .and_then(|i| i.value.as_deref())
    }

    /// The values of every identifier of `system` in use at `now`: not `use: old`, not one
    /// whose period ended before `now` (an end that cannot be read counts as ended), nor one
    /// whose period has not started (a start that cannot be read counts as not started).
    pub fn current_identifier_values(
        &self,
        system: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Vec<&str> {
        self.identifier
            .iter()
            .filter(|i| i.system.as_deref() == Some(system))
            .filter(|i| i.use_.as_deref() != Some("old"))
            .filter(|i| {
                i.period
                    .as_ref()
                    .and_then(|p| p.end.as_deref())
                    .is_none_or(|end| period_end_after(end, now))
            })
            .filter(|i| {
                i.period
                    .as_ref()
                    .and_then(|p| p.start.as_deref())
                    .is_none_or(|start| {
                        date_time_bounds(start).earliest().is_some_and(|t| t <= now)
                    })
            })
            .filter_map(|i| i.value.as_deref())
            .collect()
    }
}

/// `Observation.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObservationStatus {
    Registered,
    Preliminary,
    Final,
    Amended,
    Corrected,
    Cancelled,
    EnteredInError,
    Unknown,
}

impl ObservationStatus {
    /// `final`, `amended` or `corrected`: a result that may be acted on.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            ObservationStatus::Final | ObservationStatus::Amended | ObservationStatus::Corrected
        )
    }
}

/// An Observation.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Observation {
    pub id: Option<String>,
    #[serde(default, deserialize_with = "lenient_meta")]
    pub meta: Option<Meta>,
    pub status: ObservationStatus,
    #[serde(default)]
    pub category: Vec<CodeableConcept>,
    pub code: CodeableConcept,
    pub subject: Option<Reference>,
    pub effective_date_time: Option<String>,
    pub effective_instant: Option<String>,
    pub effective_period: Option<Period>,
    /// Whether an `effectiveTiming` is given: a schedule (events, repeats), not the one time
    /// a value was taken, so an observation timed by one has no usable time (ignored, it
    /// was dated by `issued`: an SpO2 taken 14 h before was scored as 2 minutes old, a
    /// red-team finding).
    #[serde(default, deserialize_with = "given")]
    pub effective_timing: bool,
    pub issued: Option<String>,
    pub value_quantity: Option<Quantity>,
    pub value_codeable_concept: Option<CodeableConcept>,
    /// `valueBoolean` as sent (a JSON value that is not a boolean is not usable).
    pub value_boolean: Option<serde_json::Value>,
    // Whether a `value[x]` of a type the readers do not read is given: such a value is not
    // "no value" (a *Breathing room air* observation answered "No" was scored as room air,
    // from its code alone: a red-team finding). See [`Observation::other_value`].
    #[serde(default, deserialize_with = "given")]
    pub value_string: bool,
    #[serde(default, deserialize_with = "given")]
    pub value_integer: bool,
    #[serde(default, deserialize_with = "given")]
    pub value_range: bool,
    #[serde(default, deserialize_with = "given")]
    pub value_ratio: bool,
    #[serde(default, deserialize_with = "given")]
    pub value_sampled_data: bool,
    #[serde(default, deserialize_with = "given")]
    pub value_time: bool,
    #[serde(default, deserialize_with = "given")]
    pub value_date_time: bool,
    #[serde(default, deserialize_with = "given")]
    pub value_period: bool,
    pub data_absent_reason: Option<CodeableConcept>,
    #[serde(default)]
    pub component: Vec<ObservationComponent>,
}

/// One `Observation.component`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObservationComponent {
    pub code: CodeableConcept,
    pub value_quantity: Option<Quantity>,
    pub value_codeable_concept: Option<CodeableConcept>,
    /// As [`Observation::value_boolean`].
    pub value_boolean: Option<serde_json::Value>,
    #[serde(default, deserialize_with = "given")]
    pub value_string: bool,
    #[serde(default, deserialize_with = "given")]
    pub value_integer: bool,
    #[serde(default, deserialize_with = "given")]
    pub value_range: bool,
    #[serde(default, deserialize_with = "given")]
    pub value_ratio: bool,
    #[serde(default, deserialize_with = "given")]
    pub value_sampled_data: bool,
    #[serde(default, deserialize_with = "given")]
    pub value_time: bool,
    #[serde(default, deserialize_with = "given")]
    pub value_date_time: bool,
    #[serde(default, deserialize_with = "given")]
    pub value_period: bool,
    pub data_absent_reason: Option<CodeableConcept>,
}

impl ObservationComponent {
    /// Whether a `value[x]` of a type other than Quantity, CodeableConcept or boolean is
    /// given.
    pub fn other_value(&self) -> bool {
        self.value_string
            || self.value_integer
            || self.value_range
            || self.value_ratio
            || self.value_sampled_data
            || self.value_time
            || self.value_date_time
            || self.value_period
    }
}

/// Where in time something may lie ([`Observation::time_bounds`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeBounds {
    /// At this time, to the second.
    At(DateTime<Utc>),
    /// At some time between these two (inclusive).
    Between(DateTime<Utc>, DateTime<Utc>),
    /// At any time.
    Unknown,
}

impl TimeBounds {
    /// Any time of the days `first` to `last`, in any time zone (UTC+14:00 to UTC-12:00).
    pub fn of_days(first: NaiveDate, last: NaiveDate) -> TimeBounds {
        let start = first.and_time(chrono::NaiveTime::MIN).and_utc() - chrono::Duration::hours(14);
        let end = last
            .succ_opt()
            .unwrap_or(last)
            .and_time(chrono::NaiveTime::MIN)
            .and_utc()
            + chrono::Duration::hours(12);
        TimeBounds::Between(start, end)
    }

    /// The earliest time it may be (`None`: any).
    pub fn earliest(self) -> Option<DateTime<Utc>> {
        match self {
            TimeBounds::At(t) | TimeBounds::Between(t, _) => Some(t),
            TimeBounds::Unknown => None,
        }
    }

    /// The latest time it may be (`None`: any).
    pub fn latest(self) -> Option<DateTime<Utc>> {
        match self {
            TimeBounds::At(t) | TimeBounds::Between(_, t) => Some(t),
            TimeBounds::Unknown => None,
        }
    }

    /// Whether it may be at `t` or later.
    pub fn may_be_at_or_after(self, t: DateTime<Utc>) -> bool {
        self.latest().is_none_or(|l| l >= t)
    }
}

/// Which of two readings of one thing is the later, for taking the latest: `time` is the
/// reading's time to the second (`None`: not known to the second), `latest_possible` the
/// latest time it may have been made (its `time` when it has one; `None`: any time), and
/// `tie` orders two readings of one time (e.g. by issue time).
///
/// A reading without a time is unusable, and it is the later unless a dated one is surely
/// later (made after it could have been): an older value is never silently taken in its
/// place (an SpO2 of 84 % dated only today lost to a 97 % of an hour ago, and an SBP of 60
/// dated only today to a 120 of half an hour ago: red-team findings). Of two readings without
/// a time, the one that may be the later wins.
pub fn later_reading<K: Ord>(
    candidate: (Option<DateTime<Utc>>, Option<DateTime<Utc>>, K),
    best: (Option<DateTime<Utc>>, Option<DateTime<Utc>>, K),
) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (c_time, c_latest, c_tie) = candidate;
    let (b_time, b_latest, b_tie) = best;
    match (c_time, b_time) {
        (Some(c), Some(b)) => (c, c_tie).cmp(&(b, b_tie)),
        (None, _) => match (c_latest, b_latest) {
            (None, _) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(c), Some(l)) if b_time.is_some() && c >= l => Ordering::Greater,
            (Some(c), Some(l)) => c.cmp(&l),
        },
        (Some(t), None) => match b_latest {
            Some(l) if t > l => Ordering::Greater,
            _ => Ordering::Less,
        },
    }
}

/// Where an observation's time came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSource {
    EffectiveDateTime,
    EffectiveInstant,
    /// `effectivePeriod.end`, or its `start` when it has no end.
    EffectivePeriod,
    /// `issued`, used when no `effective[x]` is given.
    Issued,
}

impl Observation {
    /// Whether a `value[x]` of a type other than Quantity, CodeableConcept or boolean is
    /// given.
    pub fn other_value(&self) -> bool {
        self.value_string
            || self.value_integer
            || self.value_range
            || self.value_ratio
            || self.value_sampled_data
            || self.value_time
            || self.value_date_time
            || self.value_period
    }

    /// The time the observation gives, and where it came from: `effectiveDateTime`,
    /// `effectiveInstant`, `effectivePeriod` (its end, else its start), else `issued`.
    /// Whether it gives more than one `effective[x]` (invalid R4: a red-team finding had
    /// `effectiveDateTime` silently win over an `effectivePeriod`).
    fn several_times(&self) -> bool {
        [
            self.effective_date_time.is_some(),
            self.effective_instant.is_some(),
            self.effective_period.is_some(),
            self.effective_timing,
        ]
        .iter()
        .filter(|&&b| b)
        .count()
            > 1
    }

    fn time_text(&self) -> Option<(&str, TimeSource)> {
        if let Some(t) = &self.effective_date_time {
            Some((t.as_str(), TimeSource::EffectiveDateTime))
        } else if let Some(t) = &self.effective_instant {
            Some((t.as_str(), TimeSource::EffectiveInstant))
        } else if let Some(p) = &self.effective_period {
            p.end
                .as_deref()
                .or(p.start.as_deref())
                .map(|t| (t, TimeSource::EffectivePeriod))
        } else {
            self.issued.as_deref().map(|t| (t, TimeSource::Issued))
        }
    }

    /// When the observation was made, to the second: `effectiveDateTime`,
    /// `effectiveInstant`, `effectivePeriod` (its end, else its start), else `issued`.
    /// `Ok(None)` when none is given; `Err` when the one given is malformed or only a date
    /// (a vital sign needs a time).
    pub fn effective(&self) -> Result<Option<(DateTime<Utc>, TimeSource)>, DateError> {
        if self.several_times() {
            return Err(DateError::SeveralTimes);
        }
        if self.effective_timing {
            return Err(DateError::Timing);
        }
        let Some((text, source)) = self.time_text() else {
            return Ok(None);
        };
        match FhirDateTime::parse(text)? {
            FhirDateTime::Instant(t) => Ok(Some((t.with_timezone(&Utc), source))),
            FhirDateTime::Date(_) => Err(DateError::NoTime),
        }
    }

    /// Where in time the observation may lie, given the time it gives (as
    /// [`Observation::effective`] picks it): a time to the second; a date without a time
    /// (or a time without its zone, on a readable date) is any time of that date in any
    /// time zone; no time, or one without a readable date, could be any time.
    pub fn time_bounds(&self) -> TimeBounds {
        if self.several_times() || self.effective_timing {
            return TimeBounds::Unknown;
        }
        match self.time_text() {
            Some((text, _)) => date_time_bounds(text),
            None => TimeBounds::Unknown,
        }
    }

    /// `issued`, parsed (`None` when absent or malformed).
    pub fn issued(&self) -> Option<DateTime<Utc>> {
        match FhirDateTime::parse(self.issued.as_deref()?) {
            Ok(FhirDateTime::Instant(t)) => Some(t.with_timezone(&Utc)),
            _ => None,
        }
    }
}

/// Whether a period ending at `end` (a FHIR dateTime) may still run at `now`: its end may
/// lie after `now` (an end that cannot be read: no).
fn period_end_after(end: &str, now: DateTime<Utc>) -> bool {
    date_time_bounds(end).latest().is_some_and(|t| t > now)
}

/// Where a FHIR date or dateTime `text` may lie: a time with its zone is that instant; a
/// date (or a time without its zone, on a readable date) is any time of that date in any
/// time zone; anything else could be any time.
fn date_time_bounds(text: &str) -> TimeBounds {
    match FhirDateTime::parse(text) {
        Ok(FhirDateTime::Instant(t)) => TimeBounds::At(t.with_timezone(&Utc)),
        Ok(FhirDateTime::Date(d)) => TimeBounds::of_days(d.earliest(), d.latest()),
        Err(_) => match text.get(..10).map(FhirDate::parse) {
            Some(Ok(FhirDate::Day(d))) => TimeBounds::of_days(d, d),
            _ => TimeBounds::Unknown,
        },
    }
}

/// A Condition.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    pub id: Option<String>,
    #[serde(default, deserialize_with = "lenient_meta")]
    pub meta: Option<Meta>,
    pub code: Option<CodeableConcept>,
    pub clinical_status: Option<CodeableConcept>,
    pub verification_status: Option<CodeableConcept>,
    pub subject: Option<Reference>,
    pub onset_date_time: Option<String>,
    /// `onsetPeriod` (only its `start` is read).
    pub onset_period: Option<serde_json::Value>,
    pub recorded_date: Option<String>,
    /// STU3's name of `recordedDate` (servers that upgraded their data keep it).
    pub asserted_date: Option<String>,
    /// `abatement[x]`, only whether one is given (R4 con-4: an abated condition is
    /// inactive, resolved or in remission).
    pub abatement_date_time: Option<serde_json::Value>,
    pub abatement_age: Option<serde_json::Value>,
    pub abatement_period: Option<serde_json::Value>,
    pub abatement_range: Option<serde_json::Value>,
    pub abatement_string: Option<serde_json::Value>,
    /// STU3's `abatementBoolean` (servers that upgraded their data keep it): `true` is
    /// abated.
    pub abatement_boolean: Option<serde_json::Value>,
}

/// Whether a Condition holds now, as far as its record says ([`Condition::activity`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activity {
    /// `active`, `recurrence` or `relapse`, and not refuted or entered in error.
    Active,
    /// `inactive`, `remission` or `resolved`; abated without a status; refuted; or
    /// entered in error.
    Inactive,
    /// No clinical status that can be read (none, as text only, a code of another
    /// system, or codings that disagree): it may hold.
    Unknown,
}

/// The code system of `Condition.clinicalStatus`.
pub const CONDITION_CLINICAL: &str = "http://terminology.hl7.org/CodeSystem/condition-clinical";
/// The code system of `Condition.verificationStatus`.
pub const CONDITION_VER_STATUS: &str = "http://terminology.hl7.org/CodeSystem/condition-ver-status";
/// STU3's system of `Condition.clinicalStatus`.
const CONDITION_CLINICAL_STU3: &str = "http://hl7.org/fhir/condition-clinical";
/// STU3's system of `Condition.verificationStatus`.
const CONDITION_VER_STATUS_STU3: &str = "http://hl7.org/fhir/condition-ver-status";

/// The systems a status of a Condition is read in: R4's, STU3's (servers that upgraded
/// their data keep it), and none (a bare `active`, as a FHIR server matches
/// `clinical-status=active` whatever its system).
fn condition_status_code<'a>(c: &'a CodeableConcept, r4: &str, stu3: &str) -> Vec<&'a str> {
    c.coding
        .iter()
        .filter(|k| k.system.as_deref().is_none_or(|s| s == r4 || s == stu3))
        .filter_map(|k| k.code.as_deref())
        .collect()
}

impl Condition {
    /// Whether the condition holds now ([`Activity`]). A verification status of `refuted`
    /// or `entered-in-error` makes it inactive whatever its clinical status; `unconfirmed`,
    /// `provisional` and `differential` count as confirmed: a service that withholds a
    /// score for a condition errs on the safe side. A Condition without a clinical status
    /// (R4 requires one only on problem-list items; encounter diagnoses often lack it) is
    /// inactive when abated and of unknown activity otherwise, never "not there" (read as
    /// inactive, an encounter diagnosis of pneumonia scored infection "no": a red-team
    /// finding).
    pub fn activity(&self) -> Activity {
        self.activity_as_of(None)
    }

    /// [`Condition::activity`] at `now`: without a clinical status, an `abatement[x]` makes it
    /// inactive only when it surely ended by `now` (`abatementBoolean: true`, or an
    /// `abatementDateTime` / `abatementPeriod.end` wholly before `now`); one dated later (a
    /// pregnancy's expected end), an age, a range or a text leaves it unknown (a sepsis with
    /// no status and an abatement three days ahead was read as over: a red-team finding).
    pub fn activity_at(&self, now: DateTime<Utc>) -> Activity {
        self.activity_as_of(Some(now))
    }

    fn activity_as_of(&self, now: Option<DateTime<Utc>>) -> Activity {
        let refuted = self.verification_status.as_ref().is_some_and(|c| {
            condition_status_code(c, CONDITION_VER_STATUS, CONDITION_VER_STATUS_STU3)
                .iter()
                .any(|c| matches!(*c, "refuted" | "entered-in-error"))
        });
        if refuted {
            return Activity::Inactive;
        }
        let codes = self.clinical_status.as_ref().map_or_else(Vec::new, |c| {
            condition_status_code(c, CONDITION_CLINICAL, CONDITION_CLINICAL_STU3)
        });
        let of = |code: &str| match code {
            "active" | "recurrence" | "relapse" => Activity::Active,
            "inactive" | "remission" | "resolved" => Activity::Inactive,
            _ => Activity::Unknown,
        };
        let mut activities = codes.iter().map(|c| of(c));
        match activities.next() {
            Some(first) if activities.all(|a| a == first) => first,
            Some(_) => Activity::Unknown,
            None if now.is_none_or(|now| self.abated_by(now)) && self.abated() => {
                Activity::Inactive
            }
            None => Activity::Unknown,
        }
    }

    /// Whether an `abatement[x]` says it ended by `now`.
    fn abated_by(&self, now: DateTime<Utc>) -> bool {
        let ended_by = |text: Option<&str>| {
            text.and_then(|t| date_time_bounds(t).latest())
                .is_some_and(|latest| latest <= now)
        };
        self.abatement_boolean == Some(serde_json::Value::Bool(true))
            || ended_by(self.abatement_date_time.as_ref().and_then(|v| v.as_str()))
            || ended_by(
                self.abatement_period
                    .as_ref()
                    .and_then(|p| p.get("end"))
                    .and_then(|e| e.as_str()),
            )
    }

    /// Whether an `abatement[x]` is given.
    fn abated(&self) -> bool {
        self.abatement_date_time.is_some()
            || self.abatement_age.is_some()
            || self.abatement_period.is_some()
            || self.abatement_range.is_some()
            || self.abatement_string.is_some()
            || self.abatement_boolean == Some(serde_json::Value::Bool(true))
    }

    /// Whether the condition surely holds now ([`Activity::Active`]).
    pub fn is_active(&self) -> bool {
        self.activity() == Activity::Active
    }

    /// When it was recorded or began, as far as the record says (`recordedDate`, else
    /// `onsetDateTime`; a date is any time of that day in any zone).
    pub fn time_bounds(&self) -> TimeBounds {
        match self
            .recorded_date
            .as_deref()
            .or(self.onset_date_time.as_deref())
        {
            Some(text) => date_time_bounds(text),
            None => TimeBounds::Unknown,
        }
    }

    /// Whether the condition may hold at `now` ([`Activity::Active`] or
    /// [`Activity::Unknown`], [`Condition::activity_at`]) and is coded as one of `codes`.
    pub fn may_be_active_one_of(&self, codes: &[SystemCode], now: DateTime<Utc>) -> bool {
        self.activity_at(now) != Activity::Inactive
            && self.code.as_ref().is_some_and(|c| c.has_any(codes))
    }

    /// Whether the condition is active and coded as one of `codes`.
    pub fn is_active_one_of(&self, codes: &[SystemCode]) -> bool {
        self.is_active() && self.code.as_ref().is_some_and(|c| c.has_any(codes))
    }

    /// Whether the condition is coded as one of `codes` and its record says it holds at
    /// `now` without doubt, for a decision that lowers a score (NEWS2's SpO2 scale 2): active
    /// ([`Condition::activity`]), its verification status `confirmed` or not given (an
    /// `unconfirmed`, `provisional` or `differential` diagnosis, or one that cannot be read,
    /// does not count here, where it counts as holding for a decision that withholds a
    /// score), no `abatement[x]` (an active Condition with one contradicts itself: R4
    /// con-4; STU3's `abatementBoolean: true` too), and no `onsetDateTime`,
    /// `onsetPeriod.start` or `recordedDate` after `now`. A review's finding: a provisional
    /// diagnosis of hypercapnic respiratory failure took a patient on air with SpO2 86 % from
    /// NEWS2 3 to 1.
    pub fn is_confirmed_one_of(&self, codes: &[SystemCode], now: DateTime<Utc>) -> bool {
        let confirmed = self.verification_status.as_ref().is_none_or(|c| {
            let codes = condition_status_code(c, CONDITION_VER_STATUS, CONDITION_VER_STATUS_STU3);
            !codes.is_empty() && codes.iter().all(|c| *c == "confirmed")
        });
        // Every time it names for its start or its record must be past: an onset in a
        // period's start, or a record dated after now, is not in force either (a
        // re-attack's finding: only onsetDateTime was read).
        let period_start = self
            .onset_period
            .as_ref()
            .and_then(|p| p.get("start"))
            .and_then(|s| s.as_str());
        let begun = [
            self.onset_date_time.as_deref(),
            period_start,
            self.recorded_date.as_deref(),
            self.asserted_date.as_deref(),
        ]
        .into_iter()
        .flatten()
        .all(|t| match date_time_bounds(t) {
            TimeBounds::At(at) => at <= now,
            TimeBounds::Between(earliest, _) => earliest <= now,
            TimeBounds::Unknown => true,
        });
        confirmed && begun && !self.abated() && self.is_active_one_of(codes)
    }
}

/// An Encounter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Encounter {
    pub id: Option<String>,
    #[serde(default, deserialize_with = "lenient_meta")]
    pub meta: Option<Meta>,
    /// As written (`planned`, `arrived`, `in-progress`, `finished`, …).
    pub status: Option<String>,
    /// `Encounter.class` (R4: one Coding, HL7 v3 ActCode: `EMER`, `IMP`, `AMB`, …).
    pub class: Option<Coding>,
    pub subject: Option<Reference>,
}

/// The code system of `Encounter.class` (HL7 v3 ActCode).
pub const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";

/// Why a FHIR date or dateTime could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DateError {
    /// Not of the form FHIR R4 gives (`YYYY[-MM[-DD[Thh:mm:ss[.s+](Z|±hh:mm)]]]`).
    #[error("not a FHIR date/dateTime")]
    Malformed,
    /// A date without a time where a time is needed.
    #[error("a date without a time")]
    NoTime,
    /// More than one `effective[x]` (R4 allows one): which is meant cannot be told.
    #[error("more than one effective time (effectiveDateTime, effectiveInstant, effectivePeriod)")]
    SeveralTimes,
    /// `effectiveTiming`: a schedule, not the time the value was taken.
    #[error("an effectiveTiming (a schedule, not the time the value was taken)")]
    Timing,
}

/// `true` for a field that is there, whatever its value (its content is not read).
fn given<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d)?;
    Ok(true)
}

/// A FHIR `date`, to the precision written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FhirDate {
    Year(i32),
    YearMonth(i32, u32),
    Day(NaiveDate),
}

impl FhirDate {
    /// Parses `YYYY`, `YYYY-MM` or `YYYY-MM-DD`.
    pub fn parse(text: &str) -> Result<FhirDate, DateError> {
        let b = text.as_bytes();
        let digits = |r: std::ops::Range<usize>| {
            b.get(r.clone())
                .filter(|s| s.iter().all(u8::is_ascii_digit))
                .map(|_| text[r].parse::<u32>().unwrap_or(0))
        };
        let year = digits(0..4).ok_or(DateError::Malformed)? as i32;
        match b.len() {
            4 => Ok(FhirDate::Year(year)),
            7 if b[4] == b'-' => {
                let m = digits(5..7).ok_or(DateError::Malformed)?;
                if !(1..=12).contains(&m) {
                    return Err(DateError::Malformed);
                }
                Ok(FhirDate::YearMonth(year, m))
            }
            10 if b[4] == b'-' && b[7] == b'-' => {
                let m = digits(5..7).ok_or(DateError::Malformed)?;
                let d = digits(8..10).ok_or(DateError::Malformed)?;
                NaiveDate::from_ymd_opt(year, m, d)
                    .map(FhirDate::Day)
                    .ok_or(DateError::Malformed)
            }
            _ => Err(DateError::Malformed),
        }
    }

    /// The earliest day this date may be.
    pub fn earliest(self) -> NaiveDate {
        match self {
            FhirDate::Year(y) => NaiveDate::from_ymd_opt(y, 1, 1).unwrap_or(NaiveDate::MIN),
            FhirDate::YearMonth(y, m) => NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(NaiveDate::MIN),
            FhirDate::Day(d) => d,
        }
    }

    /// The latest day this date may be.
    pub fn latest(self) -> NaiveDate {
        match self {
            FhirDate::Year(y) => NaiveDate::from_ymd_opt(y, 12, 31).unwrap_or(NaiveDate::MAX),
            FhirDate::YearMonth(y, m) => {
                let next = if m == 12 {
                    NaiveDate::from_ymd_opt(y + 1, 1, 1)
                } else {
                    NaiveDate::from_ymd_opt(y, m + 1, 1)
                };
                next.and_then(|d| d.pred_opt()).unwrap_or(NaiveDate::MAX)
            }
            FhirDate::Day(d) => d,
        }
    }

    /// The age in whole years on `today` of someone born on this date: the least and the
    /// greatest it can be, given the precision written (equal for a full date).
    pub fn age_on(self, today: NaiveDate) -> (i32, i32) {
        (
            whole_years(self.latest(), today),
            whole_years(self.earliest(), today),
        )
    }
}

/// Whole years from `born` to `today` (a 29 February birthday comes on 1 March in other
/// years, as in UK law).
fn whole_years(born: NaiveDate, today: NaiveDate) -> i32 {
    let mut years = today.year() - born.year();
    if (today.month(), today.day()) < (born.month(), born.day()) {
        years -= 1;
    }
    years
}

/// A FHIR `dateTime` or `instant`: a time when one is written, else a date.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FhirDateTime {
    Date(FhirDate),
    Instant(DateTime<FixedOffset>),
}

impl FhirDateTime {
    /// Parses a FHIR R4 `dateTime` (a time needs seconds and a zone, as R4 requires).
    pub fn parse(text: &str) -> Result<FhirDateTime, DateError> {
        if text.len() > 40 {
            return Err(DateError::Malformed);
        }
        if text.len() <= 10 {
            return FhirDate::parse(text).map(FhirDateTime::Date);
        }
        // R4: "T" and an upper-case "Z" only; chrono also accepts a space and lower case.
        if text.as_bytes().get(10) != Some(&b'T') || text.contains('z') {
            return Err(DateError::Malformed);
        }
        DateTime::parse_from_rfc3339(text)
            .map(FhirDateTime::Instant)
            .map_err(|_| DateError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Resource, FhirError> {
        Resource::from_json(v.to_string().as_bytes(), &Limits::default())
    }

    /// A Condition searchset page: `n` matches, with `total` and a `next` link when given.
    fn condition_page(n: usize, total: Option<u64>, next: bool) -> Value {
        let entry: Vec<Value> = (0..n)
            .map(|i| {
                json!({"fullUrl": format!("http://ehr.example/Condition/c{i}"),
                    "search": {"mode": "match"},
                    "resource": {"resourceType": "Condition", "id": format!("c{i}"),
                        "subject": {"reference": "Patient/p1"},
                        "code": {"coding": [{"system": SNOMED, "code": "38341003"}]}}})
            })
            .collect();
        let mut b = json!({"resourceType": "Bundle", "type": "searchset", "entry": entry,
            "link": [{"relation": "self", "url": "http://ehr.example/Condition?patient=p1"}]});
        if let Some(t) = total {
            b["total"] = json!(t);
        }
        if next {
            b["link"].as_array_mut().unwrap().push(json!(
                {"relation": "next", "url": "http://ehr.example/Condition?patient=p1&page=2"}));
        }
        b
    }

    #[test]
    fn a_search_page_of_a_longer_result_is_not_complete() {
        let bundle = |v: Value| match parse(v).unwrap() {
            Resource::Bundle(b) => b,
            other => panic!("{other:?}"),
        };
        // 20 of 25 matches, a next page: one page, not the patient's Conditions.
        let b = bundle(condition_page(20, Some(25), true));
        assert_eq!((b.total, b.has_next, b.matches()), (Some(25), true, 20));
        assert!(!b.is_complete());
        let r = Resources::from(Resource::Bundle(b));
        assert_eq!(r.conditions.len(), 20);
        assert!(!r.is_complete("Condition"));
        // Only the searched type is in doubt.
        assert!(r.is_complete("Observation") && r.is_complete("Encounter"));
        // Either sign alone is enough: a next link without a total, or a total above the
        // matches without a link (the server cut the page short).
        assert!(!bundle(condition_page(20, None, true)).is_complete());
        assert!(!bundle(condition_page(20, Some(25), false)).is_complete());
        // The whole result: total equal to the matches, no next link; or neither stated.
        assert!(bundle(condition_page(20, Some(20), false)).is_complete());
        assert!(bundle(condition_page(3, None, false)).is_complete());
        let r = Resources::from(parse(condition_page(20, Some(20), false)).unwrap());
        assert!(r.is_complete("Condition"));
        // Entries added by _include are not matches: 2 matches + 3 includes of total 5 is
        // not the whole result.
        let mut v = condition_page(5, Some(5), false);
        for e in &mut v["entry"].as_array_mut().unwrap()[2..] {
            e["search"]["mode"] = json!("include");
        }
        assert!(!bundle(v).is_complete());
        // A page with no matches at all (total 25, nothing on it) leaves every type in doubt.
        let r = Resources::from(parse(condition_page(0, Some(25), false)).unwrap());
        assert!(!r.is_complete("Condition") && !r.is_complete("Encounter"));
        // A partial page nested in a collection: the collection is not whole either.
        let nested = json!({"resourceType": "Bundle", "type": "collection",
            "entry": [{"resource": condition_page(20, Some(25), true)}]});
        let r = Resources::from(parse(nested).unwrap());
        assert!(!r.is_complete("Condition"));
        // Hostile shapes: a total that is not an unsignedInt, a link that is not a list.
        for bad in [json!(-1), json!(2.5), json!("25"), json!(1e30)] {
            let mut v = condition_page(1, None, false);
            v["total"] = bad;
            assert!(matches!(parse(v), Err(FhirError::InvalidResource { .. })));
        }
        let mut v = condition_page(1, None, false);
        v["link"] = json!("next");
        assert!(matches!(parse(v), Err(FhirError::InvalidResource { .. })));
        // A link without a relation, or with another one, is no next page.
        let mut v = condition_page(1, None, false);
        v["link"] = json!([{"url": "x"}, {"relation": "previous"}, {"relation": 7}]);
        assert!(parse(v).is_err());
        let mut v = condition_page(1, None, false);
        v["link"] = json!([{"url": "x"}, {"relation": "previous"}, {"relation": "nextish"}]);
        assert!(bundle(v).is_complete());
        // Relation types compare without regard to case (RFC 8288) or surrounding blanks.
        for next in ["NEXT", " Next "] {
            let mut v = condition_page(1, None, false);
            v["link"] = json!([{"relation": next, "url": "x"}]);
            assert!(!bundle(v).is_complete(), "{next:?}");
        }
    }

    /// Red-team findings: an OperationOutcome warning that results were left out, and a match
    /// of only a `fullUrl`, were read as the whole result; OIDs of SNOMED CT and LOINC were
    /// other systems.
    #[test]
    fn an_outcome_of_results_left_out_or_a_match_without_resource_is_not_whole() {
        let bundle = |v: Value| match parse(v).unwrap() {
            Resource::Bundle(b) => b,
            other => panic!("{other:?}"),
        };
        for code in ["incomplete", "suppressed", "too-costly"] {
            let mut v = condition_page(3, Some(3), false);
            v["entry"]
                .as_array_mut()
                .unwrap()
                .push(json!({"search": {"mode": "outcome"},
                "resource": {"resourceType": "OperationOutcome",
                    "issue": [{"severity": "warning", "code": code}]}}));
            let b = bundle(v);
            assert!(!b.is_complete() && b.is_search_answer(), "{code}");
            assert_eq!(b.matches(), 3);
        }
        let mut v = condition_page(3, None, false);
        v["entry"]
            .as_array_mut()
            .unwrap()
            .push(json!({"fullUrl": "http://ehr.example/Condition/c9"}));
        assert!(!bundle(v).is_complete());
        // A history's deletion has no resource by design.
        let mut v = condition_page(3, None, false);
        v["type"] = json!("history");
        v["entry"]
            .as_array_mut()
            .unwrap()
            .push(json!({"fullUrl": "http://ehr.example/Condition/c9"}));
        assert!(bundle(v).is_complete());
        assert!(bundle(condition_page(3, None, false)).matches_only("Condition"));
        assert!(!bundle(condition_page(3, None, false)).matches_only("Observation"));
        assert_eq!(canonical_system("urn:oid:2.16.840.1.113883.6.96"), SNOMED);
        assert_eq!(canonical_system("URN:OID:2.16.840.1.113883.6.1"), LOINC);
        assert_eq!(
            canonical_system("urn:oid:2.16.840.1.113883.6.90"),
            "urn:oid:2.16.840.1.113883.6.90"
        );
        assert!(CodeableConcept::of("urn:oid:2.16.840.1.113883.6.96", "1").has(SNOMED, "1"));
        assert!(CodeableConcept::of(SNOMED, "1").has("urn:oid:2.16.840.1.113883.6.96", "1"));
    }

    #[test]
    fn reads_a_patient_and_ignores_unknown_fields() {
        let r = parse(json!({
            "resourceType": "Patient", "id": "p1", "birthDate": "1950-03-04",
            "gender": "female", "active": true, "name": [{"family": "X"}],
            "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9000000009"}]
        }))
        .unwrap();
        let Resource::Patient(p) = r else {
            panic!("not a patient")
        };
        assert_eq!(p.gender, Some(Gender::Female));
        // A code outside the value set is absent, not an error; a number is still an error.
        let odd: Patient =
            serde_json::from_value(json!({"resourceType": "Patient", "gender": "xyz"})).unwrap();
        assert_eq!(odd.gender, None);
        assert!(
            serde_json::from_value::<Patient>(json!({"resourceType": "Patient", "gender": 7}))
                .is_err()
        );
        assert_eq!(
            p.birth_date().unwrap().unwrap(),
            FhirDate::Day(NaiveDate::from_ymd_opt(1950, 3, 4).unwrap())
        );
        assert_eq!(
            p.identifier_value("https://fhir.nhs.uk/Id/nhs-number"),
            Some("9000000009")
        );
        // The identifier's value is not in its Debug form.
        assert!(!format!("{p:?}").contains("9000000009"));
    }

    #[test]
    fn bundle_entries_dispatch_by_type_and_others_are_skipped() {
        let r = parse(json!({
            "resourceType": "Bundle", "type": "searchset",
            "entry": [
                {"fullUrl": "urn:a", "resource": {"resourceType": "Observation", "status": "final",
                  "code": {"coding": [{"system": LOINC, "code": "9279-1"}]},
                  "valueQuantity": {"value": 18, "unit": "/min", "system": UCUM, "code": "/min"},
                  "effectiveDateTime": "2024-01-01T10:00:00Z"}},
                {"resource": {"resourceType": "MedicationRequest", "status": "active"}},
                {"resource": {"resourceType": "Condition", "code": {"coding": [{"system": SNOMED, "code": "77386006"}]},
                  "clinicalStatus": {"coding": [{"system": CONDITION_CLINICAL, "code": "active"}]}}},
                {"search": {"mode": "outcome"}}
            ]
        }))
        .unwrap();
        let all = Resources::from(r);
        assert_eq!(all.observations.len(), 1);
        assert_eq!(all.conditions.len(), 1);
        assert_eq!(all.skipped, 1);
        assert!(all.conditions[0].is_active());
        let q = all.observations[0].value_quantity.as_ref().unwrap();
        assert_eq!(q.value, Some(18.0));
    }

    #[test]
    fn malformed_structure_is_an_error_that_names_the_place_not_the_value() {
        // In a Bundle, a malformed entry is kept as unreadable (its code and time, no value);
        // the rest of the Bundle is read.
        let r = parse(json!({
            "resourceType": "Bundle",
            "entry": [{"resource": {"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": LOINC, "code": "8867-4"}]},
                "valueQuantity": {"value": "SECRET-NAME"}}}]
        }))
        .unwrap();
        let all = Resources::from(r);
        assert_eq!(all.unreadable.len(), 1);
        assert!(all.unreadable[0].may_have_code(LOINC, "8867-4"));
        assert!(!all.unreadable[0].may_have_code(LOINC, "9279-1"));
        assert!(!format!("{all:?}").contains("SECRET-NAME"));
        // Alone, it is an error naming the place, not the value.
        let e = parse(json!({"resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": LOINC, "code": "8867-4"}]},
            "valueQuantity": {"value": "SECRET-NAME"}}))
        .unwrap_err();
        let text = e.to_string();
        assert!(text.contains('$'), "{text}");
        assert!(text.contains("Observation"), "{text}");
        assert!(!text.contains("SECRET-NAME"), "{text}");
        let e = parse(
            json!({"resourceType": "Observation", "status": "nonsense-SECRET",
            "code": {}}),
        )
        .unwrap_err();
        assert!(!e.to_string().contains("SECRET"), "{e}");
        let e = parse(json!({"resourceType": "Observation", "code": {}})).unwrap_err();
        assert!(e.to_string().contains("missing field `status`"), "{e}");
    }

    #[test]
    fn bounds() {
        let limits = Limits {
            max_bytes: 10,
            max_resources: 2,
        };
        assert!(matches!(
            Resource::from_json(br#"{"resourceType": "Patient"}"#, &limits),
            Err(FhirError::TooLarge {
                size: 27,
                limit: 10
            })
        ));
        let limits = Limits {
            max_bytes: 1 << 20,
            max_resources: 2,
        };
        let bundle = json!({"resourceType": "Bundle", "entry": [
            {"resource": {"resourceType": "Patient"}}, {"resource": {"resourceType": "Patient"}}]});
        assert!(matches!(
            Resource::from_value(&bundle, &limits),
            Err(FhirError::TooManyResources { limit: 2 })
        ));
        // Nesting: serde_json's recursion limit stays on.
        let deep = "[".repeat(10_000);
        assert!(matches!(
            Resource::from_json(deep.as_bytes(), &Limits::default()),
            Err(FhirError::Json { .. })
        ));
        let mut nested = json!({"resourceType": "Patient"});
        for _ in 0..6 {
            nested = json!({"resourceType": "Bundle", "entry": [{"resource": nested}]});
        }
        assert!(matches!(
            Resource::from_value(&nested, &Limits::default()),
            Err(FhirError::TooDeep { .. })
        ));
        assert!(matches!(
            parse(json!({"id": "x"})),
            Err(FhirError::NotAResource { .. })
        ));
        assert!(matches!(
            Resource::from_json(b"{not json", &Limits::default()),
            Err(FhirError::Json { .. })
        ));
        // FHIR JSON forbids a property named twice: which value is meant cannot be told.
        assert!(matches!(
            Resource::from_json(
                br#"{"resourceType": "Observation", "status": "final", "status": "entered-in-error"}"#,
                &Limits::default()
            ),
            Err(FhirError::RepeatedKey(_))
        ));
    }

    #[test]
    fn dates() {
        assert_eq!(FhirDate::parse("2010"), Ok(FhirDate::Year(2010)));
        assert_eq!(FhirDate::parse("2010-02"), Ok(FhirDate::YearMonth(2010, 2)));
        assert_eq!(FhirDate::parse("2010-13"), Err(DateError::Malformed));
        assert_eq!(FhirDate::parse("2010-02-30"), Err(DateError::Malformed));
        assert_eq!(FhirDate::parse("20100230"), Err(DateError::Malformed));
        let d = |y, m, d| NaiveDate::from_ymd_opt(y, m, d).unwrap();
        assert_eq!(FhirDate::YearMonth(2012, 2).latest(), d(2012, 2, 29));
        assert_eq!(FhirDate::Year(2012).latest(), d(2012, 12, 31));
        // Age on the day before, on and after the 16th birthday.
        let born = FhirDate::Day(d(2008, 6, 15));
        assert_eq!(born.age_on(d(2024, 6, 14)), (15, 15));
        assert_eq!(born.age_on(d(2024, 6, 15)), (16, 16));
        // Only the year known: 15 or 16 in mid-2024.
        assert_eq!(FhirDate::Year(2008).age_on(d(2024, 6, 15)), (15, 16));
        assert!(matches!(
            FhirDateTime::parse("2024-01-01T10:00:00+01:00"),
            Ok(FhirDateTime::Instant(_))
        ));
        assert!(matches!(
            FhirDateTime::parse("2024-01-01"),
            Ok(FhirDateTime::Date(_))
        ));
        // R4 requires seconds and a zone with a time.
        assert_eq!(
            FhirDateTime::parse("2024-01-01T10:00"),
            Err(DateError::Malformed)
        );
        assert_eq!(
            FhirDateTime::parse("2024-01-01T10:00:00"),
            Err(DateError::Malformed)
        );
        assert_eq!(
            FhirDateTime::parse("2024-01-01 10:00:00Z"),
            Err(DateError::Malformed)
        );
    }

    #[test]
    fn effective_time_sources() {
        let mut o: Observation = serde_json::from_value(json!({
            "status": "final", "code": {},
            "effectivePeriod": {"start": "2024-01-01T09:00:00Z", "end": "2024-01-01T10:00:00Z"},
            "issued": "2024-01-01T11:00:00Z"
        }))
        .unwrap();
        let (t, s) = o.effective().unwrap().unwrap();
        assert_eq!(s, TimeSource::EffectivePeriod);
        assert_eq!(t.to_rfc3339(), "2024-01-01T10:00:00+00:00");
        o.effective_period = None;
        assert_eq!(o.effective().unwrap().unwrap().1, TimeSource::Issued);
        o.effective_date_time = Some("2024-01-01".into());
        assert_eq!(o.effective(), Err(DateError::NoTime));
        // a schedule is no time: not dated by `issued` (a red-team finding)
        let timed: Observation = serde_json::from_value(json!({
            "status": "final", "code": {},
            "effectiveTiming": {"event": ["2024-01-01T00:00:00Z"]},
            "issued": "2024-01-01T11:00:00Z"
        }))
        .unwrap();
        assert_eq!(timed.effective(), Err(DateError::Timing));
    }

    #[test]
    fn references_and_conditions() {
        let r = |s: &str| Reference {
            reference: Some(s.into()),
        };
        assert_eq!(r("Patient/123").patient_id(), Some("123"));
        assert_eq!(r("Patient/123/_history/2").patient_id(), Some("123"));
        assert_eq!(
            r("https://ehr.example/fhir/Patient/123/_history/2").patient_id(),
            None
        );
        assert_eq!(r("Group/123").patient_id(), None);
        let c: Condition = serde_json::from_value(json!({
            "clinicalStatus": {"coding": [{"system": CONDITION_CLINICAL, "code": "active"}]},
            "verificationStatus": {"coding": [{"system": CONDITION_VER_STATUS, "code": "refuted"}]}
        }))
        .unwrap();
        assert!(!c.is_active());
        assert_eq!(
            SystemCode::parse("http://snomed.info/sct|77386006"),
            Some(SystemCode::new(SNOMED, "77386006"))
        );
        assert_eq!(SystemCode::parse("77386006"), None);
    }

    #[test]
    fn a_reading_without_a_time_is_later_unless_a_dated_one_surely_follows_it() {
        use std::cmp::Ordering::{Greater, Less};
        let t = |h: i64| Some(DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::hours(h));
        // Dated both: by time, then by the tie-breaker.
        assert_eq!(later_reading((t(2), t(2), 0), (t(1), t(1), 9)), Greater);
        assert_eq!(later_reading((t(1), t(1), 1), (t(1), t(1), 0)), Greater);
        assert_eq!(later_reading((t(1), t(1), 0), (t(1), t(1), 1)), Less);
        // No time at all: later than anything.
        assert_eq!(later_reading((None, None, 0), (t(5), t(5), 0)), Greater);
        assert_eq!(later_reading((t(5), t(5), 0), (None, None, 0)), Less);
        // Dated by its day (may be as late as hour 30): later than a dated reading it may
        // follow, earlier than one surely after it.
        assert_eq!(later_reading((None, t(30), 0), (t(10), t(10), 0)), Greater);
        assert_eq!(later_reading((None, t(30), 0), (t(30), t(30), 0)), Greater);
        assert_eq!(later_reading((None, t(30), 0), (t(31), t(31), 0)), Less);
        assert_eq!(later_reading((t(31), t(31), 0), (None, t(30), 0)), Greater);
        assert_eq!(later_reading((t(30), t(30), 0), (None, t(30), 0)), Less);
        // Two without a time: the one that may be the later.
        assert_eq!(later_reading((None, t(40), 0), (None, t(30), 0)), Greater);
        assert_eq!(later_reading((None, t(30), 0), (None, None, 0)), Less);
    }

    /// Red-team finding: a `meta` that is not valid FHIR (a number for `versionId`, a
    /// string for `meta`) refused the whole resource; it only orders versions.
    #[test]
    fn a_malformed_meta_never_refuses_a_resource() {
        for meta in [
            json!({"versionId": 2}),
            json!({"lastUpdated": 12}),
            json!("x"),
            json!(null),
        ] {
            let p = parse(json!({"resourceType": "Patient", "id": "p1", "meta": meta}));
            assert!(matches!(p, Ok(Resource::Patient(_))), "{meta}: {p:?}");
        }
        let Ok(Resource::Patient(p)) =
            parse(json!({"resourceType": "Patient", "id": "p1", "meta": {"versionId": 2}}))
        else {
            panic!()
        };
        assert_eq!(p.meta.and_then(|m| m.version_id).as_deref(), Some("2"));
    }
}
