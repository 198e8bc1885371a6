//! Routing: which bundles a series goes to, and where its results are sent.
//!
//! With no routes configured, every bundle with a `[dicom]` section gets the series its
//! section accepts (one route per bundle, named `bundle:<name>`), and results go to
//! `--results-destination`. A bundle's `[dicom]` section is checked on every route: the
//! router never sends a bundle a series it does not declare.

use std::fmt;
use std::str::FromStr;

use nightingale_dicom::series::SeriesHeader;
use nightingale_models::manifest::DicomAccepts;

/// A C-STORE destination: `AE@host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    pub ae_title: String,
    /// `host:port`.
    pub addr: String,
}

impl FromStr for Destination {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ae, addr) = s
            .split_once('@')
            .ok_or_else(|| format!("{s:?}: expected AE@HOST:PORT"))?;
        let ae = ae.trim();
        // A comma is the separator of a job's stored destinations: "PA,CS@host:104" was
        // taken, then sent to an AE title nobody configured (a red-team finding).
        if ae.is_empty()
            || ae.len() > 16
            || !ae
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'\\' && b != b',')
        {
            return Err(format!(
                "{s:?}: the AE title must be 1 to 16 printable characters, no backslash or comma"
            ));
        }
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: expected AE@HOST:PORT"))?;
        if host.is_empty() || port.parse::<u16>().ok().filter(|p| *p > 0).is_none() {
            return Err(format!("{s:?}: expected AE@HOST:PORT with a port 1-65535"));
        }
        // A host name or an IPv4 address, or an IPv6 one in brackets: not "B@127.0.0.1" or
        // "host name" (taken, then failing at every connect).
        let bracketed = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok());
        let named = host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !(bracketed || named) {
            return Err(format!(
                "{s:?}: the host must be a name, an IPv4 address or an [IPv6] address"
            ));
        }
        Ok(Destination {
            ae_title: ae.to_owned(),
            addr: addr.to_owned(),
        })
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.ae_title, self.addr)
    }
}

/// What a series must look like for a route (each empty list matches anything).
#[derive(Debug, Clone, Default)]
pub struct Match {
    pub calling_aes: Vec<String>,
    pub modalities: Vec<String>,
    pub body_parts: Vec<String>,
    pub photometric: Vec<String>,
    pub sop_classes: Vec<String>,
    pub series_description: Option<regex::Regex>,
    pub rows: Option<(u32, u32)>,
    pub columns: Option<(u32, u32)>,
    pub frames: Option<(u32, u32)>,
}

fn listed(list: &[String], value: &str) -> bool {
    list.is_empty()
        || list
            .iter()
            .any(|v| v.trim().eq_ignore_ascii_case(value.trim()))
}

fn within(range: Option<(u32, u32)>, value: Option<u32>) -> bool {
    match (range, value) {
        (None, _) => true,
        (Some((lo, hi)), Some(v)) => lo <= v && v <= hi,
        (Some(_), None) => false,
    }
}

impl Match {
    /// Why `header` (from `calling_ae`) does not match, or `None` when it does.
    pub fn mismatch(&self, header: &SeriesHeader, calling_ae: &str) -> Option<String> {
        if !listed(&self.calling_aes, calling_ae) {
            return Some("calling AE not routed".into());
        }
        if !listed(&self.modalities, &header.modality) {
            return Some(format!("modality {:?} not accepted", header.modality));
        }
        if !listed(&self.body_parts, &header.body_part) {
            return Some("body part not accepted".into());
        }
        if !listed(&self.photometric, &header.photometric) {
            return Some(format!(
                "photometric interpretation {:?} not accepted",
                header.photometric
            ));
        }
        if !listed(&self.sop_classes, &header.sop_class_uid) {
            return Some(format!("SOP class {} not accepted", header.sop_class_uid));
        }
        if let Some(re) = &self.series_description
            && !re.is_match(&header.series_description)
        {
            return Some("series description does not match".into());
        }
        if !within(self.rows, header.rows) || !within(self.columns, header.columns) {
            return Some("image size out of the route's range".into());
        }
        if !within(self.frames, Some(header.frames)) {
            return Some(format!(
                "{} frames: out of the route's range",
                header.frames
            ));
        }
        None
    }

    /// What a bundle's `[dicom]` section accepts.
    pub fn of_bundle(accepts: &DicomAccepts) -> Match {
        Match {
            modalities: accepts.modalities.clone(),
            body_parts: accepts.body_parts.clone(),
            photometric: accepts.photometric.clone(),
            sop_classes: accepts.sop_classes.clone(),
            frames: accepts.max_frames.map(|m| (1, m)),
            ..Match::default()
        }
    }
}

/// Why a volume bundle (`[dicom] inference = "volume"`) cannot take a series, as far as the
/// header of its first instance and its instance count tell: a multi-frame instance among
/// others, too few or too many slices, colour. `None`: it may (the job checks every
/// instance's geometry, and fails with the reason when the series is not a volume after all).
pub fn volume_mismatch(
    accepts: &DicomAccepts,
    header: &SeriesHeader,
    instances: u64,
) -> Option<String> {
    if !accepts.is_volume() {
        return None;
    }
    if header.frames > 1 && instances > 1 {
        return Some(format!(
            "not a volume: a multi-frame instance among {instances} instances"
        ));
    }
    let slices = if header.frames > 1 {
        u64::from(header.frames)
    } else {
        instances
    };
    let (min, max) = accepts.slices();
    if slices < u64::from(min) {
        return Some(format!(
            "{slices} slice(s): the bundle takes a volume of at least {min}"
        ));
    }
    if slices > u64::from(max) {
        return Some(format!(
            "{slices} slices: the bundle takes a volume of at most {max}"
        ));
    }
    let grey = ["MONOCHROME1", "MONOCHROME2"];
    if !grey
        .iter()
        .any(|g| header.photometric.trim().eq_ignore_ascii_case(g))
    {
        return Some(format!(
            "photometric interpretation {:?}: a volume is grey-scale",
            header.photometric
        ));
    }
    None
}

/// A `[[routes]]` table of the config file.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(default)]
    pub calling_ae: Vec<String>,
    #[serde(default)]
    pub modality: Vec<String>,
    #[serde(default)]
    pub body_part: Vec<String>,
    #[serde(default)]
    pub photometric: Vec<String>,
    #[serde(default)]
    pub sop_class: Vec<String>,
    /// A regular expression the Series Description must match (anywhere; anchor it with
    /// `^…$` to match the whole).
    #[serde(default)]
    pub series_description: Option<String>,
    /// `[min, max]`, inclusive.
    #[serde(default)]
    pub rows: Option<[u32; 2]>,
    #[serde(default)]
    pub columns: Option<[u32; 2]>,
    #[serde(default)]
    pub frames: Option<[u32; 2]>,
    pub bundles: Vec<String>,
    /// `AE@HOST:PORT` (default: `--results-destination`).
    #[serde(default)]
    pub destinations: Option<Vec<String>>,
    /// This route's quiet time in seconds (default: `--series-quiet-secs`).
    #[serde(default)]
    pub quiet_secs: Option<f64>,
    /// This route's instance count that completes a series at once (default:
    /// `--series-complete-instances`).
    #[serde(default)]
    pub complete_instances: Option<u64>,
    /// The outputs reported in the result objects (default: the bundle's `[dicom] report`).
    /// Every bundle of the route must have them.
    #[serde(default)]
    pub report: Vec<String>,
}

impl RouteConfig {
    /// The route, with `default_destinations` where it names none.
    pub fn compile(&self, default_destinations: &[Destination]) -> Result<Route, String> {
        let fail = |m: String| Err(format!("route {:?}: {m}", self.name));
        if self.name.trim().is_empty() || self.name.len() > 64 {
            return Err("every route has a name of 1-64 characters".into());
        }
        if self.bundles.is_empty() {
            return fail("it names no bundle".into());
        }
        for (i, b) in self.bundles.iter().enumerate() {
            if b.trim().is_empty() || self.bundles[..i].contains(b) {
                return fail(format!("bundle {b:?} is empty or listed twice"));
            }
        }
        let range = |what: &str, r: Option<[u32; 2]>| -> Result<Option<(u32, u32)>, String> {
            match r {
                Some([lo, hi]) if lo > hi => Err(format!(
                    "route {:?}: {what} range [{lo}, {hi}] is empty",
                    self.name
                )),
                Some([lo, hi]) => Ok(Some((lo, hi))),
                None => Ok(None),
            }
        };
        let series_description = match &self.series_description {
            None => None,
            Some(re) => match regex::RegexBuilder::new(re).size_limit(1 << 20).build() {
                Ok(re) => Some(re),
                Err(e) => return fail(format!("series_description is not a valid regex: {e}")),
            },
        };
        let quiet = match self.quiet_secs {
            None => None,
            Some(q) if q.is_finite() && (0.0..=86_400.0).contains(&q) => {
                Some(std::time::Duration::from_secs_f64(q))
            }
            Some(q) => return fail(format!("quiet_secs {q} is not between 0 and 86400")),
        };
        if self.complete_instances == Some(0) {
            return fail("complete_instances must be at least 1".into());
        }
        let mut report = Vec::with_capacity(self.report.len());
        for name in &self.report {
            let name = name.trim();
            if name.is_empty() || report.iter().any(|r: &String| r == name) {
                return fail(format!("report: {name:?} is empty or listed twice"));
            }
            report.push(name.to_owned());
        }
        let destinations = match &self.destinations {
            None => default_destinations.to_vec(),
            Some(list) => list
                .iter()
                .map(|d| d.parse())
                .collect::<Result<Vec<Destination>, String>>()
                .map_err(|e| format!("route {:?}: {e}", self.name))?,
        };
        Ok(Route {
            name: self.name.clone(),
            matcher: Match {
                calling_aes: self.calling_ae.clone(),
                modalities: self.modality.clone(),
                body_parts: self.body_part.clone(),
                photometric: self.photometric.clone(),
                sop_classes: self.sop_class.clone(),
                series_description,
                rows: range("rows", self.rows)?,
                columns: range("columns", self.columns)?,
                frames: range("frames", self.frames)?,
            },
            bundles: self.bundles.clone(),
            destinations,
            quiet,
            complete_at: self.complete_instances,
            report,
        })
    }
}

/// A route: a match, the bundles it feeds and where their results go.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub matcher: Match,
    pub bundles: Vec<String>,
    pub destinations: Vec<Destination>,
    /// The route's own quiet time (`None`: the pipeline's).
    pub quiet: Option<std::time::Duration>,
    /// The route's own instance count that completes a series (`None`: the pipeline's).
    pub complete_at: Option<u64>,
    /// Outputs to report (empty: the bundle's `[dicom] report`).
    pub report: Vec<String>,
}

impl Route {
    /// Whether a series last touched at `last_received_ms` with `instances` instances is
    /// complete for this route at `now_ms`, given the pipeline's defaults; when it is not,
    /// the time at which the quiet time will have passed.
    pub fn complete(
        &self,
        instances: u64,
        last_received_ms: i64,
        now_ms: i64,
        default_quiet: std::time::Duration,
        default_complete_at: Option<u64>,
    ) -> Result<(), i64> {
        let quiet = self.quiet.unwrap_or(default_quiet).as_millis() as i64;
        let quiet_until = last_received_ms.saturating_add(quiet);
        let count_reached = self
            .complete_at
            .or(default_complete_at)
            .is_some_and(|n| instances >= n);
        if count_reached || now_ms >= quiet_until {
            Ok(())
        } else {
            Err(quiet_until)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse_strictly() {
        let d: Destination = "PACS@127.0.0.1:4242".parse().unwrap();
        assert_eq!(d.ae_title, "PACS");
        assert_eq!(d.addr, "127.0.0.1:4242");
        assert_eq!(d.to_string(), "PACS@127.0.0.1:4242");
        for bad in [
            "PACS",
            "@h:1",
            "PACS@h",
            "PACS@h:0",
            "PACS@h:70000",
            "A-VERY-LONG-AE-TITLE@h:1",
            "A\\B@h:1",
            "PACS@:104",
            // Red-team findings: a comma split one destination into two when stored; a
            // second '@' or a space made a host no connect can reach.
            "PA,CS@127.0.0.1:104",
            "A@B@127.0.0.1:104",
            "PACS@host name:104",
            "PACS@[::1:104",
            "PACS@[nope]:104",
        ] {
            assert!(bad.parse::<Destination>().is_err(), "{bad} parsed");
        }
        for good in [
            "PACS@pacs-1.trust.nhs.uk:104",
            "PACS@[::1]:104",
            "MY PACS@h_1:11112",
        ] {
            assert!(good.parse::<Destination>().is_ok(), "{good} refused");
        }
    }

    #[test]
    fn configured_routes_compile_or_say_why_not() {
        let default: Vec<Destination> = vec!["PACS@h:104".parse().unwrap()];
        let config: RouteConfig = toml::from_str(
            r#"
            name = "chest"
            modality = ["CR", "DX"]
            series_description = "(?i)chest"
            rows = [256, 4096]
            bundles = ["image-orientation"]
            "#,
        )
        .unwrap();
        let route = config.compile(&default).unwrap();
        assert_eq!(route.destinations, default);
        let h = SeriesHeader {
            modality: "DX".into(),
            series_description: "PA Chest".into(),
            rows: Some(2000),
            frames: 1,
            ..SeriesHeader::default()
        };
        assert_eq!(route.matcher.mismatch(&h, "ANY"), None);
        let small = SeriesHeader {
            rows: Some(100),
            ..h.clone()
        };
        assert!(route.matcher.mismatch(&small, "ANY").is_some());
        let knee = SeriesHeader {
            series_description: "knee".into(),
            ..h
        };
        assert!(route.matcher.mismatch(&knee, "ANY").is_some());

        for bad in [
            "name = \"x\"\nbundles = []",
            "name = \"x\"\nbundles = [\"m\"]\nrows = [5, 1]",
            "name = \"x\"\nbundles = [\"m\"]\nseries_description = \"(\"",
            "name = \"x\"\nbundles = [\"m\"]\ndestinations = [\"nope\"]",
            // A bundle twice made a superseded job of every series (red-team).
            "name = \"x\"\nbundles = [\"m\", \"m\"]",
            "name = \"x\"\nbundles = [\"\"]",
        ] {
            let c: RouteConfig = toml::from_str(bad).unwrap();
            assert!(c.compile(&default).is_err(), "{bad} compiled");
        }
        assert!(
            toml::from_str::<RouteConfig>("name = \"x\"\nbundles = [\"m\"]\nmodalty = []").is_err()
        );
    }

    #[test]
    fn a_route_has_its_own_quiet_time_count_and_outputs() {
        let config: RouteConfig = toml::from_str(
            r#"
            name = "ct"
            modality = ["CT"]
            quiet_secs = 30
            complete_instances = 100
            report = ["misoriented"]
            bundles = ["image-orientation"]
            "#,
        )
        .unwrap();
        let route = config.compile(&[]).unwrap();
        assert_eq!(route.quiet, Some(std::time::Duration::from_secs(30)));
        assert_eq!(route.report, vec!["misoriented".to_owned()]);
        let ten = std::time::Duration::from_secs(10);
        // Quiet for 20 s of its 30: not yet, and it says until when.
        assert_eq!(route.complete(5, 1_000, 21_000, ten, None), Err(31_000));
        assert_eq!(route.complete(5, 1_000, 31_000, ten, None), Ok(()));
        // 100 instances complete it at once; the pipeline's count does not apply.
        assert_eq!(route.complete(100, 1_000, 1_000, ten, Some(1_000)), Ok(()));
        assert!(route.complete(99, 1_000, 1_000, ten, Some(2)).is_err());
        // A route without its own settings uses the pipeline's.
        let plain: RouteConfig = toml::from_str("name = \"x\"\nbundles = [\"m\"]").unwrap();
        let plain = plain.compile(&[]).unwrap();
        assert_eq!(plain.complete(1, 1_000, 10_999, ten, None), Err(11_000));
        assert_eq!(plain.complete(2, 1_000, 1_000, ten, Some(2)), Ok(()));

        for bad in [
            "quiet_secs = -1",
            "quiet_secs = 86401",
            "quiet_secs = nan",
            "complete_instances = 0",
            "report = [\"\"]",
            "report = [\"a\", \"a\"]",
        ] {
            let c: RouteConfig =
                toml::from_str(&format!("name = \"x\"\nbundles = [\"m\"]\n{bad}")).unwrap();
            assert!(c.compile(&[]).is_err(), "{bad} compiled");
        }
    }

    #[test]
    fn a_bundles_section_bounds_what_it_gets() {
        let m = Match::of_bundle(&DicomAccepts {
            modalities: vec!["CR".into(), "DX".into()],
            photometric: vec!["MONOCHROME2".into()],
            max_frames: Some(1),
            ..DicomAccepts::default()
        });
        let mut h = SeriesHeader {
            modality: "CR".into(),
            photometric: "MONOCHROME2".into(),
            frames: 1,
            ..SeriesHeader::default()
        };
        assert_eq!(m.mismatch(&h, "ANY"), None);
        h.modality = "dx".into();
        assert_eq!(m.mismatch(&h, "ANY"), None);
        h.frames = 2;
        assert!(m.mismatch(&h, "ANY").is_some());
        h.frames = 1;
        h.photometric = "RGB".into();
        assert!(m.mismatch(&h, "ANY").is_some());
        h.photometric = "MONOCHROME2".into();
        h.modality = "US".into();
        assert!(m.mismatch(&h, "ANY").unwrap().contains("US"));
    }

    #[test]
    fn a_volume_bundle_is_not_sent_what_cannot_be_a_volume() {
        use nightingale_models::manifest::DicomInference;
        let volume = DicomAccepts {
            inference: DicomInference::Volume,
            min_slices: Some(3),
            max_slices: Some(100),
            ..DicomAccepts::default()
        };
        let single = SeriesHeader {
            modality: "CT".into(),
            photometric: "MONOCHROME2".into(),
            frames: 1,
            ..SeriesHeader::default()
        };
        assert_eq!(volume_mismatch(&volume, &single, 3), None);
        assert_eq!(volume_mismatch(&volume, &single, 100), None);
        assert!(
            volume_mismatch(&volume, &single, 2)
                .unwrap()
                .contains("at least 3")
        );
        assert!(
            volume_mismatch(&volume, &single, 101)
                .unwrap()
                .contains("at most 100")
        );
        let multi = SeriesHeader {
            frames: 40,
            ..single.clone()
        };
        assert_eq!(volume_mismatch(&volume, &multi, 1), None);
        assert!(
            volume_mismatch(&volume, &multi, 2)
                .unwrap()
                .contains("multi-frame")
        );
        let colour = SeriesHeader {
            photometric: "RGB".into(),
            ..single.clone()
        };
        assert!(
            volume_mismatch(&volume, &colour, 10)
                .unwrap()
                .contains("grey")
        );
        // A per-frame bundle is not concerned.
        assert_eq!(volume_mismatch(&DicomAccepts::default(), &single, 1), None);
    }
}
