//! A series as one volume (`nightingale_dicom::volume`) on real multi-frame objects from the
//! pydicom wheel (eCT_Supplemental: an Enhanced CT with per-frame positions and a shared
//! orientation and rescale; emri_small: an Enhanced MR with no functional groups), and hostile
//! geometry attributes. The real files are found as in tests/pixels.rs (NIGHTINGALE_PYDICOM_DIR
//! and NIGHTINGALE_PYDICOM_DATA_DIR; skipped without them unless NIGHTINGALE_PEERS=1). The expected geometry is the files' own
//! attributes as pydicom prints them.

use std::path::PathBuf;

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::{InMemDicomObject, OpenFileOptions};
use nightingale_dicom::pixels::{
    DecodeOptions, ImageHeader, Limits, PixelError, PixelSource, Values, Voi, VoiFunction,
    WindowLevel,
};
use nightingale_dicom::volume::{InstanceGeometry, SliceOrder, frame_windows, plan_volume};

/// A test file of the pydicom wheel or of pydicom-data (where pydicom's `get_testdata_file`
/// finds it), or None (skip) when the packages are not installed.
fn test_file(name: &str) -> Option<PathBuf> {
    let dirs = (
        std::env::var_os("NIGHTINGALE_PYDICOM_DIR").map(PathBuf::from),
        std::env::var_os("NIGHTINGALE_PYDICOM_DATA_DIR").map(PathBuf::from),
    );
    match dirs {
        (Some(a), Some(b)) if a.is_dir() && b.is_dir() => {
            let found = [
                a.join("data/test_files").join(name),
                b.join("data").join(name),
            ]
            .into_iter()
            .find(|p| p.is_file());
            Some(found.unwrap_or_else(|| panic!("{name} is in neither package")))
        }
        _ if std::env::var("NIGHTINGALE_PEERS").as_deref() == Ok("1") => panic!(
            "NIGHTINGALE_PEERS=1 but NIGHTINGALE_PYDICOM_DIR / NIGHTINGALE_PYDICOM_DATA_DIR do \
             not name the pydicom and pydicom-data packages"
        ),
        _ => {
            eprintln!(
                "skipped: set NIGHTINGALE_PYDICOM_DIR and NIGHTINGALE_PYDICOM_DATA_DIR \
                 (scripts/test.sh does)"
            );
            None
        }
    }
}

fn geometry_of(path: PathBuf) -> (ImageHeader, InstanceGeometry) {
    let obj = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .unwrap();
    let header = ImageHeader::from_object(&obj, &Limits::default()).unwrap();
    let geometry = InstanceGeometry::read(&obj, header.frames).unwrap();
    (header, geometry)
}

#[test]
fn an_enhanced_ct_is_ordered_by_its_frame_positions_with_its_shared_rescale() {
    let Some(path) = test_file("eCT_Supplemental.dcm") else {
        return;
    };
    let (header, g) = geometry_of(path);
    assert_eq!(
        (header.frames, header.slope, header.intercept),
        (2, 1.0, 0.0)
    );
    assert_eq!(g.frames.len(), 2);
    assert_eq!(g.frames[0].position, Some([99.5, -301.5, -159.0]));
    assert_eq!(g.frames[1].position, Some([99.5, -301.5, -149.0]));
    for f in &g.frames {
        assert_eq!(f.orientation, Some([-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]));
        assert_eq!(f.rescale, Some((1.0, -1024.0)));
    }
    // The normal of rows -x, columns +y is -z: frame 1 (z = -149) comes first.
    let plan = plan_volume(&[g], 2, 10).unwrap();
    assert_eq!(plan.order, SliceOrder::Position);
    let order: Vec<u32> = plan.slices.iter().map(|s| s.frame).collect();
    assert_eq!(order, vec![1, 0]);
    assert_eq!(plan.spacing_mm, Some(10.0));
    assert_eq!(plan.slices[0].rescale, Some((1.0, -1024.0)));
}

/// Frame by frame too (the per-frame pipeline, validation datasets), an enhanced object's
/// rescale comes from its functional groups: eCT_Supplemental has no top-level Rescale
/// Slope/Intercept, and pydicom reads its Shared Functional Groups' Pixel Value
/// Transformation as slope 1, intercept -1024 (`ds.SharedFunctionalGroupsSequence[0]
/// .PixelValueTransformationSequence[0]`). (pydicom's own `apply_modality_lut` ignores it.)
#[test]
fn an_enhanced_ct_frame_carries_its_functional_group_rescale() {
    let Some(path) = test_file("eCT_Supplemental.dcm") else {
        return;
    };
    let source = PixelSource::open(&path, &Limits::default()).unwrap();
    let stored = DecodeOptions::default();
    let modality = DecodeOptions {
        modality_lut: true,
        ..DecodeOptions::default()
    };
    for index in 0..source.header().frames {
        let raw = source.frame(index, &stored).unwrap();
        assert_eq!(raw.values, Values::Stored);
        assert_eq!((raw.slope, raw.intercept), (1.0, -1024.0));
        let hu = source.frame(index, &modality).unwrap();
        assert_eq!(hu.values, Values::Modality);
        assert_eq!((hu.slope, hu.intercept), (1.0, 0.0));
        for (s, m) in raw.data.iter().zip(&hu.data) {
            assert_eq!(*m, *s - 1024.0);
        }
    }
    // The whole object as one volume: one rescale for both frames, kept as stored values.
    let volume = source.volume(&stored).unwrap();
    assert_eq!((volume.slope, volume.intercept), (1.0, -1024.0));
}

/// An enhanced object's window comes from its Frame VOI LUT functional group: eCT_Supplemental
/// has no top-level Window Center/Width, and pydicom reads its shared group's as centre 49,
/// width 102 (`ds.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]`, no VOI LUT
/// Function: LINEAR). A decode asked for the object's own window applies it (it was refused
/// as missing before), and the frame carries it for the Secondary Capture's rendering.
#[test]
fn an_enhanced_ct_frame_carries_its_functional_group_window() {
    let Some(path) = test_file("eCT_Supplemental.dcm") else {
        return;
    };
    let source = PixelSource::open(&path, &Limits::default()).unwrap();
    assert_eq!(source.header().window, None);
    let expected = WindowLevel {
        center: 49.0,
        width: 102.0,
        function: VoiFunction::Linear,
    };
    let own = DecodeOptions {
        voi: Voi::FromObject,
        ..DecodeOptions::default()
    };
    let given = DecodeOptions {
        voi: Voi::Window {
            center: 49.0,
            width: 102.0,
        },
        ..DecodeOptions::default()
    };
    for index in 0..source.header().frames {
        let stored = source.frame(index, &DecodeOptions::default()).unwrap();
        assert_eq!(stored.window, Some(expected));
        let windowed = source.frame(index, &own).unwrap();
        assert_eq!(windowed.values, Values::Voi);
        assert_eq!(windowed.data, source.frame(index, &given).unwrap().data);
        // Soft tissue: both ends of the window are reached in a CT of the head.
        assert!(windowed.data.contains(&0.0));
        assert!(windowed.data.contains(&1.0));
    }
}

/// A Frame VOI LUT item with a centre and a width (and optionally a function).
fn voi_group(center: &str, width: &str, function: Option<&str>) -> InMemDicomObject {
    let mut voi = InMemDicomObject::new_empty();
    voi.put(DataElement::new(tags::WINDOW_CENTER, VR::DS, ds(center)));
    voi.put(DataElement::new(tags::WINDOW_WIDTH, VR::DS, ds(width)));
    if let Some(f) = function {
        voi.put(DataElement::new(
            tags::VOILUT_FUNCTION,
            VR::CS,
            PrimitiveValue::from(f),
        ));
    }
    let mut group = InMemDicomObject::new_empty();
    group.put(DataElement::new(
        tags::FRAME_VOILUT_SEQUENCE,
        VR::SQ,
        DataSetSequence::from(vec![voi]),
    ));
    group
}

#[test]
fn a_frames_own_window_overrides_the_shared_one_and_a_broken_one_is_no_window() {
    let window = |center, width, function| {
        Some(WindowLevel {
            center,
            width,
            function,
        })
    };
    // No functional groups: nothing to say (the top-level attributes apply).
    assert!(frame_windows(&InMemDicomObject::new_empty(), 3).is_empty());

    let mut obj = InMemDicomObject::new_empty();
    obj.put(DataElement::new(
        tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE,
        VR::SQ,
        DataSetSequence::from(vec![voi_group("40", "400", None)]),
    ));
    obj.put(DataElement::new(
        tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE,
        VR::SQ,
        DataSetSequence::from(vec![
            InMemDicomObject::new_empty(),
            // Several windows: the first pair, as for the top-level attributes.
            voi_group("-600\\40", "1500\\400", Some("SIGMOID")),
            voi_group("x", "400", None),
        ]),
    ));
    let shared = window(40.0, 400.0, VoiFunction::Linear);
    assert_eq!(
        frame_windows(&obj, 4),
        vec![
            shared,
            window(-600.0, 1500.0, VoiFunction::Sigmoid),
            // Not a number: no window of its own, so the shared one.
            shared,
            // More frames than per-frame items: the shared one.
            shared,
        ]
    );
}

#[test]
fn an_enhanced_mr_without_functional_groups_goes_in_frame_order() {
    let Some(path) = test_file("emri_small.dcm") else {
        return;
    };
    let (header, g) = geometry_of(path);
    assert_eq!(header.frames, 10);
    assert!(
        g.frames
            .iter()
            .all(|f| f.position.is_none() && f.rescale.is_none())
    );
    let plan = plan_volume(std::slice::from_ref(&g), 2, 10).unwrap();
    assert_eq!(plan.order, SliceOrder::FrameOrder);
    assert_eq!(plan.slices.len(), 10);
    assert_eq!(plan.middle().frame, 4);
    assert_eq!(
        plan_volume(&[g], 11, 20).unwrap_err().reason(),
        "too_few_slices"
    );
}

/// A multi-valued text element as a parser reads it (one string per value).
fn ds(values: &str) -> PrimitiveValue {
    PrimitiveValue::Strs(values.split('\\').map(str::to_owned).collect())
}

fn with_frames(frames: usize, items: usize) -> InMemDicomObject {
    let mut obj = InMemDicomObject::new_empty();
    obj.put(DataElement::new(
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        ds(&frames.to_string()),
    ));
    let item = |z: usize| {
        let mut position = InMemDicomObject::new_empty();
        position.put(DataElement::new(
            tags::IMAGE_POSITION_PATIENT,
            VR::DS,
            ds(&format!("0\\0\\{z}")),
        ));
        let mut group = InMemDicomObject::new_empty();
        group.put(DataElement::new(
            tags::PLANE_POSITION_SEQUENCE,
            VR::SQ,
            DataSetSequence::from(vec![position]),
        ));
        group
    };
    obj.put(DataElement::new(
        tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE,
        VR::SQ,
        DataSetSequence::from((0..items).map(item).collect::<Vec<_>>()),
    ));
    obj
}

#[test]
fn hostile_geometry_is_an_error_with_its_attribute() {
    // Functional groups for 2 frames in a 3-frame object.
    let obj = with_frames(3, 2);
    assert!(matches!(
        InstanceGeometry::read(&obj, 3),
        Err(PixelError::InvalidAttribute {
            name: "PerFrameFunctionalGroupsSequence"
        })
    ));
    let ok = InstanceGeometry::read(&with_frames(3, 3), 3).unwrap();
    assert_eq!(ok.frames[2].position, Some([0.0, 0.0, 2.0]));
    // Positions without an orientation cannot be placed: the frames have positions, so frame
    // order is not taken either.
    assert_eq!(
        plan_volume(&[ok], 2, 10).unwrap_err().reason(),
        "incomplete_geometry"
    );
    for (value, name) in [
        ("1\\2", "ImagePositionPatient"),
        ("1\\2\\x", "ImagePositionPatient"),
        ("1\\0\\0\\0\\1", "ImageOrientationPatient"),
    ] {
        let mut obj = InMemDicomObject::new_empty();
        let tag = if name == "ImagePositionPatient" {
            tags::IMAGE_POSITION_PATIENT
        } else {
            tags::IMAGE_ORIENTATION_PATIENT
        };
        obj.put(DataElement::new(tag, VR::DS, ds(value)));
        assert!(
            matches!(
                InstanceGeometry::read(&obj, 1),
                Err(PixelError::InvalidAttribute { name: n }) if n == name
            ),
            "{value}"
        );
    }
}
