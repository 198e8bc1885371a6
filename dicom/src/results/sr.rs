//! The structured report: a Comprehensive SR following TID 1500 (Imaging Measurement Report).
//!
//! ```text
//! CONTAINER (126000, DCM, "Imaging Measurement Report")          [DCMR 1500]
//!  HAS CONCEPT MOD  CODE (121049, DCM, "Language of Content Item and Descendants") = en
//!  HAS OBS CONTEXT  CODE (121005, DCM, "Observer Type") = (121007, DCM, "Device")  [TID 1004]
//!  HAS OBS CONTEXT  UIDREF (121012, DCM, "Device Observer UID") = device UID
//!  HAS OBS CONTEXT  TEXT (121013 Device Observer Name, 121014 Manufacturer, 121015 Model Name)
//!  HAS CONCEPT MOD  CODE (121058, DCM, "Procedure reported") = source procedure or
//!                   (363679005, SCT, "Imaging procedure")
//!  CONTAINS CONTAINER (111028, DCM, "Image Library")                            [TID 1600]
//!   CONTAINS CONTAINER (126200, DCM, "Image Library Group")
//!    CONTAINS IMAGE  every source instance
//!  CONTAINS CONTAINER (126010, DCM, "Imaging Measurements")
//!   CONTAINS CONTAINER (125007, DCM, "Measurement Group")  one per finding      [TID 1501]
//!    HAS OBS CONTEXT TEXT (112039, DCM, "Tracking Identifier") = "<bundle> <label>"
//!    HAS OBS CONTEXT UIDREF (112040, DCM, "Tracking Unique Identifier") = new UID
//!    HAS CONCEPT MOD CODE (121071, DCM, "Finding") = the bundle's declared code for the
//!                   output (e.g. (27925004, SCT, "Nodule")), else a local one
//!    CONTAINS NUM (122157, DCM, "Probability") = p, unit ("1", UCUM, "no units")  [TID 300]
//!     HAS CONCEPT MOD TEXT (111001, DCM, "Algorithm Name") = bundle name         [TID 4019]
//!     HAS CONCEPT MOD TEXT (111003, DCM, "Algorithm Version") = bundle version
//!     INFERRED FROM IMAGE (121112, DCM, "Source of Measurement") = the instance (and frame)
//!                   that had it, for a per-frame model's finding              [TID 320]
//!    CONTAINS NUM (122411, DCM, "Threshold Value") = operating threshold, unit "1" (same)
//!    CONTAINS CODE <label> = (52101004, SCT, "Present") | (272519000, SCT, "Absent")
//!    CONTAINS TEXT (121106, DCM, "Comment") = "Intended use: <text>"
//! ```

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use super::common::{
    all_ascii, copy_source, date_time, ds, put, put_code, put_equipment, put_seq, put_sop_common,
    short, to_part10,
};
use super::source::SourceSeries;
use super::{
    AI_RESULT_LABEL, COMPREHENSIVE_SR, Code, Finding, LOCAL_SCHEME, MANUFACTURER, MeasuredOn,
    ResultContext, ResultError, ResultObject, SR_SERIES_NUMBER, Uid, check_findings,
};

fn dcm(value: &str, meaning: &str) -> Code {
    Code::new(value, "DCM", meaning)
}

/// A content item: relationship (none for the root), value type and concept name.
fn item(relationship: Option<&str>, value_type: &str, concept: Option<&Code>) -> InMemDicomObject {
    let mut obj = InMemDicomObject::new_empty();
    if let Some(r) = relationship {
        put(&mut obj, tags::RELATIONSHIP_TYPE, VR::CS, r);
    }
    put(&mut obj, tags::VALUE_TYPE, VR::CS, value_type);
    if let Some(c) = concept {
        put_code(&mut obj, tags::CONCEPT_NAME_CODE_SEQUENCE, c);
    }
    obj
}

fn container(
    relationship: Option<&str>,
    concept: &Code,
    children: Vec<InMemDicomObject>,
) -> InMemDicomObject {
    let mut obj = item(relationship, "CONTAINER", Some(concept));
    put(&mut obj, tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE");
    put_seq(&mut obj, tags::CONTENT_SEQUENCE, children);
    obj
}

fn text(relationship: &str, concept: &Code, value: &str) -> InMemDicomObject {
    let mut obj = item(Some(relationship), "TEXT", Some(concept));
    put(&mut obj, tags::TEXT_VALUE, VR::UT, value);
    obj
}

fn code(relationship: &str, concept: &Code, value: &Code) -> InMemDicomObject {
    let mut obj = item(Some(relationship), "CODE", Some(concept));
    put_code(&mut obj, tags::CONCEPT_CODE_SEQUENCE, value);
    obj
}

fn uidref(relationship: &str, concept: &Code, value: &Uid) -> InMemDicomObject {
    let mut obj = item(Some(relationship), "UIDREF", Some(concept));
    put(&mut obj, tags::UID, VR::UI, value.as_str());
    obj
}

/// A NUM with no units (UCUM "1"): DS text plus the exact binary value, and the algorithm
/// that measured it (TID 300's TID 4019 Algorithm Identification).
fn num(
    ctx: &ResultContext,
    concept: &Code,
    value: f32,
    inferred_from: Option<InMemDicomObject>,
) -> InMemDicomObject {
    let mut obj = item(Some("CONTAINS"), "NUM", Some(concept));
    let mut measured = InMemDicomObject::new_empty();
    put_code(
        &mut measured,
        tags::MEASUREMENT_UNITS_CODE_SEQUENCE,
        &Code::new("1", "UCUM", "no units"),
    );
    put(&mut measured, tags::NUMERIC_VALUE, VR::DS, &ds(value));
    measured.put(DataElement::new(
        tags::FLOATING_POINT_VALUE,
        VR::FD,
        PrimitiveValue::from(f64::from(value)),
    ));
    put_seq(&mut obj, tags::MEASURED_VALUE_SEQUENCE, vec![measured]);
    put_seq(
        &mut obj,
        tags::CONTENT_SEQUENCE,
        vec![
            text(
                "HAS CONCEPT MOD",
                &dcm("111001", "Algorithm Name"),
                &ctx.bundle_name,
            ),
            text(
                "HAS CONCEPT MOD",
                &dcm("111003", "Algorithm Version"),
                &ctx.bundle_version,
            ),
        ]
        .into_iter()
        .chain(inferred_from)
        .collect(),
    );
    obj
}

fn image(sop_class: &Uid, sop_instance: &Uid) -> InMemDicomObject {
    let mut obj = item(Some("CONTAINS"), "IMAGE", None);
    put_seq(
        &mut obj,
        tags::REFERENCED_SOP_SEQUENCE,
        vec![sop_ref(sop_class, sop_instance)],
    );
    obj
}

pub(crate) fn sop_ref(sop_class: &Uid, sop_instance: &Uid) -> InMemDicomObject {
    let mut r = InMemDicomObject::new_empty();
    put(
        &mut r,
        tags::REFERENCED_SOP_CLASS_UID,
        VR::UI,
        sop_class.as_str(),
    );
    put(
        &mut r,
        tags::REFERENCED_SOP_INSTANCE_UID,
        VR::UI,
        sop_instance.as_str(),
    );
    r
}

/// The image a probability was measured on: TID 300's `INFERRED FROM` TID 320 IMAGE,
/// `(121112, DCM, "Source of Measurement")`, with its frame for a multi-frame instance.
fn source_of_measurement(source: &SourceSeries, on: MeasuredOn) -> InMemDicomObject {
    let instance = &source.instances[on.instance];
    let mut obj = item(
        Some("INFERRED FROM"),
        "IMAGE",
        Some(&dcm("121112", "Source of Measurement")),
    );
    let mut reference = sop_ref(&instance.sop_class_uid, &instance.sop_instance_uid);
    if let Some(frame) = on.frame {
        reference.put(DataElement::new(
            tags::REFERENCED_FRAME_NUMBER,
            VR::IS,
            PrimitiveValue::from(frame.to_string()),
        ));
    }
    put_seq(&mut obj, tags::REFERENCED_SOP_SEQUENCE, vec![reference]);
    obj
}

fn measurement_group(
    ctx: &ResultContext,
    source: &SourceSeries,
    f: &Finding,
    illustration: Option<&ResultObject>,
) -> InMemDicomObject {
    let probability = num(
        ctx,
        &dcm("122157", "Probability"),
        f.probability,
        f.measured_on.map(|on| source_of_measurement(source, on)),
    );
    let presence = if f.positive {
        Code::new("52101004", "SCT", "Present")
    } else {
        Code::new("272519000", "SCT", "Absent")
    };
    container(
        Some("CONTAINS"),
        &dcm("125007", "Measurement Group"),
        vec![
            text(
                "HAS OBS CONTEXT",
                &dcm("112039", "Tracking Identifier"),
                &format!("{} {}", ctx.bundle_name, f.label.meaning),
            ),
            uidref(
                "HAS OBS CONTEXT",
                &dcm("112040", "Tracking Unique Identifier"),
                &Uid::generate(),
            ),
            code("HAS CONCEPT MOD", &dcm("121071", "Finding"), &f.label),
            probability,
            num(ctx, &dcm("122411", "Threshold Value"), f.threshold, None),
            code("CONTAINS", &f.label, &presence),
            text(
                "CONTAINS",
                &dcm("121106", "Comment"),
                &format!("Intended use: {}", ctx.intended_use),
            ),
        ]
        .into_iter()
        .chain(illustration.map(|sc| {
            let mut obj = item(
                Some("CONTAINS"),
                "IMAGE",
                Some(&dcm("121200", "Illustration of ROI")),
            );
            let class = Uid::parse(sc.sop_class_uid).expect("a constant UID");
            put_seq(
                &mut obj,
                tags::REFERENCED_SOP_SEQUENCE,
                vec![sop_ref(&class, &sc.sop_instance_uid)],
            );
            obj
        }))
        .collect(),
    )
}

/// One study's item of a Hierarchical SOP Instance Reference Macro (PS3.3 C.17.2.1) naming
/// one instance.
fn hierarchical_ref(study: &Uid, series: &Uid, class: &Uid, instance: &Uid) -> InMemDicomObject {
    let mut s = InMemDicomObject::new_empty();
    put(&mut s, tags::SERIES_INSTANCE_UID, VR::UI, series.as_str());
    put_seq(
        &mut s,
        tags::REFERENCED_SOP_SEQUENCE,
        vec![sop_ref(class, instance)],
    );
    let mut item = InMemDicomObject::new_empty();
    put(&mut item, tags::STUDY_INSTANCE_UID, VR::UI, study.as_str());
    put_seq(&mut item, tags::REFERENCED_SERIES_SEQUENCE, vec![s]);
    item
}

/// An earlier SR of the same study that a new one replaces (see [`build_sr_with`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Predecessor {
    pub series_instance_uid: Uid,
    pub sop_class_uid: Uid,
    pub sop_instance_uid: Uid,
}

/// The TID 1500 Comprehensive SR for `findings` on `source`, as Part 10 bytes.
pub fn build_sr(
    source: &SourceSeries,
    ctx: &ResultContext,
    findings: &[Finding],
) -> Result<ResultObject, ResultError> {
    build_sr_illustrated(source, ctx, findings, None)
}

/// [`build_sr`], with the first finding's measurement group referring to `illustration`
/// (the secondary capture that shows that finding's saliency heatmap) as
/// `CONTAINS IMAGE (121200, DCM, "Illustration of ROI")`, and the secondary capture listed
/// in the Pertinent Other Evidence Sequence (every instance an SR's content refers to is in
/// one of its evidence sequences, PS3.3 C.17.2.3).
pub fn build_sr_illustrated(
    source: &SourceSeries,
    ctx: &ResultContext,
    findings: &[Finding],
    illustration: Option<&ResultObject>,
) -> Result<ResultObject, ResultError> {
    build_sr_with(source, ctx, findings, illustration, None)
}

/// [`build_sr_illustrated`], naming `predecessor` (an earlier SR of this series' results
/// that this one replaces: the series grew, or was processed again) in the Predecessor
/// Documents Sequence.
pub fn build_sr_with(
    source: &SourceSeries,
    ctx: &ResultContext,
    findings: &[Finding],
    illustration: Option<&ResultObject>,
    predecessor: Option<&Predecessor>,
) -> Result<ResultObject, ResultError> {
    check_findings(source, findings)?;
    let sop_instance_uid = Uid::generate();
    let series_instance_uid = Uid::generate();
    let (date, time) = date_time(ctx, source);
    let ascii = all_ascii(
        [
            ctx.bundle_name.as_str(),
            &ctx.bundle_version,
            &ctx.nightingale_version,
            &ctx.intended_use,
        ]
        .into_iter()
        .chain(findings.iter().flat_map(|f| {
            [
                f.label.value.as_str(),
                f.label.scheme.as_str(),
                f.label.meaning.as_str(),
            ]
        })),
    );

    let mut obj = InMemDicomObject::new_empty();
    put_sop_common(&mut obj, COMPREHENSIVE_SR, &sop_instance_uid, ctx, source);
    copy_source(&mut obj, source, ascii);

    // Private coding schemes used (the `99` prefix, e.g. Code::local's) are identified in
    // the Coding Scheme Identification Sequence (SOP Common).
    let mut private: Vec<&str> = findings
        .iter()
        .map(|f| f.label.scheme.as_str())
        .filter(|s| s.starts_with("99"))
        .collect();
    private.sort_unstable();
    private.dedup();
    if !private.is_empty() {
        let items = private
            .iter()
            .map(|scheme| {
                let mut item = InMemDicomObject::new_empty();
                put(
                    &mut item,
                    tags::CODING_SCHEME_DESIGNATOR,
                    VR::SH,
                    &short(scheme, 16),
                );
                let name = if *scheme == LOCAL_SCHEME {
                    "Nightingale bundle output names"
                } else {
                    scheme
                };
                put(&mut item, tags::CODING_SCHEME_NAME, VR::ST, name);
                item
            })
            .collect();
        put_seq(&mut obj, tags::CODING_SCHEME_IDENTIFICATION_SEQUENCE, items);
    }

    // SR Document Series
    put(&mut obj, tags::MODALITY, VR::CS, "SR");
    put(
        &mut obj,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        series_instance_uid.as_str(),
    );
    put(
        &mut obj,
        tags::SERIES_NUMBER,
        VR::IS,
        &SR_SERIES_NUMBER.to_string(),
    );
    put(&mut obj, tags::SERIES_DATE, VR::DA, &date);
    put(&mut obj, tags::SERIES_TIME, VR::TM, &time);
    put(
        &mut obj,
        tags::SERIES_DESCRIPTION,
        VR::LO,
        &short(&format!("{} ({})", AI_RESULT_LABEL, ctx.bundle_name), 64),
    );
    put_seq(
        &mut obj,
        tags::REFERENCED_PERFORMED_PROCEDURE_STEP_SEQUENCE,
        vec![],
    );

    put_equipment(&mut obj, ctx);

    // SR Document General
    put(&mut obj, tags::INSTANCE_NUMBER, VR::IS, "1");
    put(&mut obj, tags::COMPLETION_FLAG, VR::CS, "COMPLETE");
    put(&mut obj, tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED");
    put(&mut obj, tags::CONTENT_DATE, VR::DA, &date);
    put(&mut obj, tags::CONTENT_TIME, VR::TM, &time);
    put_seq(&mut obj, tags::PERFORMED_PROCEDURE_CODE_SEQUENCE, vec![]);
    let mut series = InMemDicomObject::new_empty();
    put(
        &mut series,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        source.series_instance_uid.as_str(),
    );
    put_seq(
        &mut series,
        tags::REFERENCED_SOP_SEQUENCE,
        source
            .instances
            .iter()
            .map(|i| sop_ref(&i.sop_class_uid, &i.sop_instance_uid))
            .collect(),
    );
    let mut study = InMemDicomObject::new_empty();
    put(
        &mut study,
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        source.study_instance_uid.as_str(),
    );
    put_seq(&mut study, tags::REFERENCED_SERIES_SEQUENCE, vec![series]);
    put_seq(
        &mut obj,
        tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
        vec![study],
    );
    if let Some(sc) = illustration {
        let class = Uid::parse(sc.sop_class_uid).expect("a constant UID");
        put_seq(
            &mut obj,
            tags::PERTINENT_OTHER_EVIDENCE_SEQUENCE,
            vec![hierarchical_ref(
                &sc.study_instance_uid,
                &sc.series_instance_uid,
                &class,
                &sc.sop_instance_uid,
            )],
        );
    }
    // An earlier result of the same series and bundle that this one replaces (PS3.3
    // C.17.2.3, Type 1C: the report revises it): a PACS or viewer sees which is current.
    if let Some(p) = predecessor {
        put_seq(
            &mut obj,
            tags::PREDECESSOR_DOCUMENTS_SEQUENCE,
            vec![hierarchical_ref(
                &source.study_instance_uid,
                &p.series_instance_uid,
                &p.sop_class_uid,
                &p.sop_instance_uid,
            )],
        );
    }

    // SR Document Content
    let mut template = InMemDicomObject::new_empty();
    put(&mut template, tags::MAPPING_RESOURCE, VR::CS, "DCMR");
    put(&mut template, tags::TEMPLATE_IDENTIFIER, VR::CS, "1500");

    let procedures = if source.procedures.is_empty() {
        vec![Code::new("363679005", "SCT", "Imaging procedure")]
    } else {
        source.procedures.clone()
    };
    let mut children = vec![
        code(
            "HAS CONCEPT MOD",
            &dcm("121049", "Language of Content Item and Descendants"),
            &Code::new("en", "RFC5646", "English"),
        ),
        code(
            "HAS OBS CONTEXT",
            &dcm("121005", "Observer Type"),
            &dcm("121007", "Device"),
        ),
        uidref(
            "HAS OBS CONTEXT",
            &dcm("121012", "Device Observer UID"),
            &ctx.device_uid,
        ),
        text(
            "HAS OBS CONTEXT",
            &dcm("121013", "Device Observer Name"),
            &ctx.bundle_name,
        ),
        text(
            "HAS OBS CONTEXT",
            &dcm("121014", "Device Observer Manufacturer"),
            MANUFACTURER,
        ),
        text(
            "HAS OBS CONTEXT",
            &dcm("121015", "Device Observer Model Name"),
            &ctx.bundle_name,
        ),
    ];
    children.extend(
        procedures
            .iter()
            .map(|p| code("HAS CONCEPT MOD", &dcm("121058", "Procedure reported"), p)),
    );
    children.push(container(
        Some("CONTAINS"),
        &dcm("111028", "Image Library"),
        vec![container(
            Some("CONTAINS"),
            &dcm("126200", "Image Library Group"),
            source
                .instances
                .iter()
                .map(|i| image(&i.sop_class_uid, &i.sop_instance_uid))
                .collect(),
        )],
    ));
    children.push(container(
        Some("CONTAINS"),
        &dcm("126010", "Imaging Measurements"),
        findings
            .iter()
            .enumerate()
            .map(|(k, f)| measurement_group(ctx, source, f, illustration.filter(|_| k == 0)))
            .collect(),
    ));
    let root = container(None, &dcm("126000", "Imaging Measurement Report"), children);
    for e in root {
        obj.put(e);
    }
    put_seq(&mut obj, tags::CONTENT_TEMPLATE_SEQUENCE, vec![template]);

    let study_instance_uid = source.study_instance_uid.clone();
    Ok(ResultObject {
        sop_class_uid: COMPREHENSIVE_SR,
        sop_instance_uid,
        series_instance_uid,
        study_instance_uid,
        bytes: to_part10(obj)?,
    })
}
