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
        if ae.is_empty()
            || ae.len() > 16
            || !ae.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
        {
            return Err(format!(
                "{s:?}: the AE title must be 1 to 16 printable characters, no backslash"
            ));
        }
        let (host, port) = addr
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: expected AE@HOST:PORT"))?;
        if host.is_empty() || port.parse::<u16>().ok().filter(|p| *p > 0).is_none() {
            return Err(format!("{s:?}: expected AE@HOST:PORT with a port 1-65535"));
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

/// A route: a match, the bundles it feeds and where their results go.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub matcher: Match,
    pub bundles: Vec<String>,
    pub destinations: Vec<Destination>,
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
        ] {
            assert!(bad.parse::<Destination>().is_err(), "{bad} parsed");
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
}
