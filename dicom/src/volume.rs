//! A series as one volume (`[dicom] inference = "volume"`): where each slice is, in what
//! order the slices go, and the series that cannot be a volume.
//!
//! A volume is either the frames of ONE multi-frame instance, or the single-frame instances
//! of a series (never a mix, never two multi-frame objects). The slices are ordered:
//!
//! 1. when every slice has an Image Position (Patient) and an Image Orientation (Patient)
//!    (a multi-frame object's from its Per-frame / Shared Functional Groups, Plane Position
//!    and Plane Orientation; a single-frame instance's own), by the position projected on the
//!    slice normal (row cosines × column cosines), ascending: for an axial series, from the
//!    patient's feet to the head. The orientations must agree (each cosine within
//!    [`ORIENTATION_TOLERANCE`]), no two slices may share a position (gap under
//!    [`DUPLICATE_GAP_MM`]), and the gaps must be even (each within 10 % of the median gap,
//!    + 0.01 mm): a missing slice would otherwise be resampled as if it were not missing;
//! 2. else, when no slice has a position: a multi-frame object's frames in frame order; the
//!    single-frame instances by Instance Number (which must be there, and distinct);
//! 3. a series where some slices have a position and others do not is refused.
//!
//! Enhanced objects keep their rescale in the Pixel Value Transformation functional group;
//! [`SliceGeometry::rescale`] carries it (per frame, else shared) so that the slice's
//! modality values are right.
//!
//! Every refusal is a [`VolumeError`] with a stable [`reason`](VolumeError::reason) and no
//! patient data.

use dicom_core::Tag;
use dicom_core::header::HasLength;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use crate::pixels::{PixelError, WindowLevel};

/// Largest difference between two slices' direction cosines that is still one orientation
/// (about 0.06 degrees).
pub const ORIENTATION_TOLERANCE: f64 = 1e-3;

/// How far the row and column cosines may be from unit length and from orthogonal (their
/// dot product): cosines written to six digits are within 1e-5 of both.
pub const UNIT_TOLERANCE: f64 = 1e-2;
/// Two slices closer than this along the normal (mm) are at the same position.
pub const DUPLICATE_GAP_MM: f64 = 1e-3;

/// Where one frame is, and its rescale when a functional group gives one.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SliceGeometry {
    /// Image Position (Patient), mm.
    pub position: Option<[f64; 3]>,
    /// Image Orientation (Patient): row then column direction cosines.
    pub orientation: Option<[f64; 6]>,
    /// Rescale slope and intercept of the Pixel Value Transformation functional group.
    pub rescale: Option<(f64, f64)>,
}

/// The geometry of one instance: one [`SliceGeometry`] per frame.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InstanceGeometry {
    pub frames: Vec<SliceGeometry>,
    pub instance_number: Option<i64>,
}

impl InstanceGeometry {
    /// Reads the geometry of an object with `frames` frames (its header: the pixel data is
    /// not needed). Malformed positions, orientations or functional groups are errors.
    pub fn read(obj: &InMemDicomObject, frames: u32) -> Result<Self, PixelError> {
        let instance_number = obj
            .element_opt(tags::INSTANCE_NUMBER)
            .ok()
            .flatten()
            .and_then(|e| e.to_int::<i64>().ok());
        let top = SliceGeometry {
            position: vector::<3>(obj, tags::IMAGE_POSITION_PATIENT, "ImagePositionPatient")?,
            orientation: vector::<6>(
                obj,
                tags::IMAGE_ORIENTATION_PATIENT,
                "ImageOrientationPatient",
            )?,
            rescale: None,
        };
        let shared = match item(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, 0) {
            Some(group) => functional_group(group)?,
            None => SliceGeometry::default(),
        };
        let per_frame = obj
            .element_opt(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
            .ok()
            .flatten()
            .map(|e| e.items().map(|items| items.len()).unwrap_or(0));
        if let Some(n) = per_frame
            && n != frames as usize
        {
            return Err(PixelError::InvalidAttribute {
                name: "PerFrameFunctionalGroupsSequence",
            });
        }
        let mut out = Vec::with_capacity(frames as usize);
        for f in 0..frames as usize {
            let own = match item(obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, f) {
                Some(group) => functional_group(group)?,
                None => SliceGeometry::default(),
            };
            // A single-frame object's own position; a multi-frame object's per frame (its
            // top-level Image Position, if any, is not one frame's).
            let position =
                own.position
                    .or(shared.position)
                    .or(if frames == 1 { top.position } else { None });
            out.push(SliceGeometry {
                position,
                orientation: own.orientation.or(shared.orientation).or(top.orientation),
                rescale: own.rescale.or(shared.rescale),
            });
        }
        Ok(InstanceGeometry {
            frames: out,
            instance_number,
        })
    }
}

/// Plane Position, Plane Orientation and Pixel Value Transformation of one functional group
/// item.
fn functional_group(group: &InMemDicomObject) -> Result<SliceGeometry, PixelError> {
    let position = match item(group, tags::PLANE_POSITION_SEQUENCE, 0) {
        Some(i) => vector::<3>(i, tags::IMAGE_POSITION_PATIENT, "ImagePositionPatient")?,
        None => None,
    };
    let orientation = match item(group, tags::PLANE_ORIENTATION_SEQUENCE, 0) {
        Some(i) => vector::<6>(
            i,
            tags::IMAGE_ORIENTATION_PATIENT,
            "ImageOrientationPatient",
        )?,
        None => None,
    };
    Ok(SliceGeometry {
        position,
        orientation,
        rescale: pixel_value_transformation(group)?,
    })
}

/// The rescale (slope, intercept) of one functional group item's Pixel Value Transformation,
/// if it has one.
fn pixel_value_transformation(group: &InMemDicomObject) -> Result<Option<(f64, f64)>, PixelError> {
    let Some(i) = item(group, tags::PIXEL_VALUE_TRANSFORMATION_SEQUENCE, 0) else {
        return Ok(None);
    };
    let slope = vector::<1>(i, tags::RESCALE_SLOPE, "RescaleSlope")?;
    let intercept = vector::<1>(i, tags::RESCALE_INTERCEPT, "RescaleIntercept")?;
    match (slope, intercept) {
        (Some([s]), Some([b])) if s != 0.0 && s.is_finite() && b.is_finite() => Ok(Some((s, b))),
        (None, None) => Ok(None),
        _ => Err(PixelError::InvalidAttribute {
            name: "PixelValueTransformationSequence",
        }),
    }
}

/// The rescale of each of an object's `frames` frames from its functional groups (the
/// frame's own Pixel Value Transformation, else the shared one; `None`: the object's
/// top-level Rescale Slope/Intercept apply). Empty when the object has no functional groups.
/// Only the rescale is read: the per-frame path needs no geometry (and none of the volume
/// path's strictness about it).
pub fn frame_rescales(
    obj: &InMemDicomObject,
    frames: u32,
) -> Result<Vec<Option<(f64, f64)>>, PixelError> {
    // A Pixel Value Transformation that is there but malformed is an error.
    per_frame_groups(obj, frames, pixel_value_transformation)
}

/// The window of each of an object's `frames` frames from its functional groups (the frame's
/// own Frame VOI LUT, else the shared one; `None`: the object's top-level Window
/// Center/Width apply). Empty when the object has no functional groups. As with the
/// top-level attributes, a window that is absent, incomplete or not a number is no window.
pub fn frame_windows(obj: &InMemDicomObject, frames: u32) -> Vec<Option<WindowLevel>> {
    let voi = |group: &InMemDicomObject| {
        Ok(item(group, tags::FRAME_VOILUT_SEQUENCE, 0).and_then(crate::pixels::window_of))
    };
    per_frame_groups(obj, frames, voi).unwrap_or_default()
}

/// What `read` finds in each frame's functional groups: the frame's own item, else the
/// shared one. Empty when the object has neither functional group sequence. Lenient on the
/// item count (real objects, e.g. pydicom's liver_1frame SEG, carry more per-frame items than
/// frames): a frame without its own item takes the shared value.
fn per_frame_groups<T: Copy>(
    obj: &InMemDicomObject,
    frames: u32,
    read: impl Fn(&InMemDicomObject) -> Result<Option<T>, PixelError>,
) -> Result<Vec<Option<T>>, PixelError> {
    let shared = match item(obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, 0) {
        Some(group) => read(group)?,
        None => None,
    };
    let per_frame = obj
        .element_opt(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .ok()
        .flatten()
        .is_some();
    if shared.is_none() && !per_frame {
        return Ok(vec![]);
    }
    (0..frames as usize)
        .map(|f| {
            let own = match item(obj, tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, f) {
                Some(group) => read(group)?,
                None => None,
            };
            Ok(own.or(shared))
        })
        .collect()
}

fn item(obj: &InMemDicomObject, tag: Tag, index: usize) -> Option<&InMemDicomObject> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.items())
        .and_then(|items| items.get(index))
}

/// `N` finite numbers, or None when the attribute is absent or empty.
fn vector<const N: usize>(
    obj: &InMemDicomObject,
    tag: Tag,
    name: &'static str,
) -> Result<Option<[f64; N]>, PixelError> {
    let Some(e) = obj.element_opt(tag).ok().flatten() else {
        return Ok(None);
    };
    if e.value().primitive().is_some_and(|p| p.is_empty()) {
        return Ok(None);
    }
    let values = e
        .to_multi_float64()
        .map_err(|_| PixelError::InvalidAttribute { name })?;
    let array: [f64; N] = values
        .try_into()
        .map_err(|_| PixelError::InvalidAttribute { name })?;
    if array.iter().all(|v| v.is_finite()) {
        Ok(Some(array))
    } else {
        Err(PixelError::InvalidAttribute { name })
    }
}

/// Why a series cannot be a volume. [`reason`](Self::reason) is a stable code; no message
/// carries patient data.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VolumeError {
    #[error(
        "{multi_frame} multi-frame instance(s) among {instances} instances: a volume is one multi-frame instance or single-frame instances"
    )]
    MultiFrameMixed {
        multi_frame: usize,
        instances: usize,
    },
    #[error("{slices} slice(s); the bundle takes a volume of at least {min}")]
    TooFewSlices { slices: usize, min: u32 },
    #[error("{slices} slices; the bundle takes a volume of at most {max}")]
    TooManySlices { slices: usize, max: u32 },
    #[error("slice {index} (in arrival order) has another Image Orientation than the first")]
    MixedOrientation { index: usize },
    #[error(
        "the Image Orientation's row and column cosines are not two orthogonal unit directions"
    )]
    DegenerateOrientation,
    #[error("a slice's position along the slice normal cannot be computed (its values overflow)")]
    PositionOverflow,
    #[error("two slices are at the same position along the slice normal ({gap_mm:.4} mm apart)")]
    DuplicatePosition { gap_mm: f64 },
    #[error(
        "the slices are unevenly spaced (gaps from {min_mm:.3} to {max_mm:.3} mm, median {median_mm:.3} mm): a slice may be missing"
    )]
    UnevenSpacing {
        min_mm: f64,
        max_mm: f64,
        median_mm: f64,
    },
    #[error("{without} of {slices} slices have no Image Position/Orientation (Patient)")]
    IncompleteGeometry { without: usize, slices: usize },
    #[error("the slices have no position and {why}: their order is unknown")]
    NoSliceOrder { why: &'static str },
}

impl VolumeError {
    /// A stable code for the failure's kind (metrics labels, the results API, tests).
    pub fn reason(&self) -> &'static str {
        match self {
            VolumeError::MultiFrameMixed { .. } => "multiframe_mixed",
            VolumeError::TooFewSlices { .. } => "too_few_slices",
            VolumeError::TooManySlices { .. } => "too_many_slices",
            VolumeError::MixedOrientation { .. } | VolumeError::DegenerateOrientation => {
                "mixed_orientation"
            }
            VolumeError::DuplicatePosition { .. } | VolumeError::PositionOverflow => {
                "duplicate_position"
            }
            VolumeError::UnevenSpacing { .. } => "uneven_spacing",
            VolumeError::IncompleteGeometry { .. } => "incomplete_geometry",
            VolumeError::NoSliceOrder { .. } => "no_slice_order",
        }
    }
}

/// One slice of a volume: which instance (its index among those given) and frame.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SliceRef {
    pub instance: usize,
    pub frame: u32,
    /// The functional groups' rescale (slope, intercept), overriding the instance's.
    pub rescale: Option<(f64, f64)>,
}

/// How the slices were ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SliceOrder {
    /// By position along the slice normal.
    Position,
    /// By Instance Number (single-frame instances without positions).
    InstanceNumber,
    /// A multi-frame object's frames as stored (no positions).
    FrameOrder,
}

impl SliceOrder {
    /// `position`, `instance-number` or `frame-order`.
    pub fn as_str(self) -> &'static str {
        match self {
            SliceOrder::Position => "position",
            SliceOrder::InstanceNumber => "instance-number",
            SliceOrder::FrameOrder => "frame-order",
        }
    }
}

/// The slices of a volume, in order.
#[derive(Clone, Debug, PartialEq)]
pub struct VolumePlan {
    pub slices: Vec<SliceRef>,
    pub order: SliceOrder,
    /// The median gap between slices along the normal (mm), when ordered by position.
    pub spacing_mm: Option<f64>,
}

impl VolumePlan {
    /// The slice in the middle of the volume (the lower middle of an even count).
    pub fn middle(&self) -> SliceRef {
        self.slices[(self.slices.len() - 1) / 2]
    }
}

/// Orders the slices of a series' instances (in arrival order) into a volume of
/// `min_slices ..= max_slices` slices, or says why they cannot be one.
pub fn plan_volume(
    instances: &[InstanceGeometry],
    min_slices: u32,
    max_slices: u32,
) -> Result<VolumePlan, VolumeError> {
    let multi_frame = instances.iter().filter(|i| i.frames.len() > 1).count();
    if multi_frame > 0 && instances.len() > 1 {
        return Err(VolumeError::MultiFrameMixed {
            multi_frame,
            instances: instances.len(),
        });
    }
    let is_multi_frame = multi_frame == 1;
    // (slice, its geometry, the instance number) in arrival / frame order.
    let slices: Vec<(SliceRef, &SliceGeometry, Option<i64>)> = instances
        .iter()
        .enumerate()
        .flat_map(|(i, inst)| {
            inst.frames.iter().enumerate().map(move |(f, g)| {
                (
                    SliceRef {
                        instance: i,
                        frame: f as u32,
                        rescale: g.rescale,
                    },
                    g,
                    inst.instance_number,
                )
            })
        })
        .collect();
    let n = slices.len();
    if n < min_slices as usize {
        return Err(VolumeError::TooFewSlices {
            slices: n,
            min: min_slices,
        });
    }
    if n > max_slices as usize {
        return Err(VolumeError::TooManySlices {
            slices: n,
            max: max_slices,
        });
    }
    let placed = slices
        .iter()
        .filter(|(_, g, _)| g.position.is_some() && g.orientation.is_some())
        .count();
    if placed == n {
        return by_position(&slices);
    }
    if placed > 0 || slices.iter().any(|(_, g, _)| g.position.is_some()) {
        return Err(VolumeError::IncompleteGeometry {
            without: n - placed,
            slices: n,
        });
    }
    if is_multi_frame {
        return Ok(VolumePlan {
            slices: slices.iter().map(|s| s.0).collect(),
            order: SliceOrder::FrameOrder,
            spacing_mm: None,
        });
    }
    let mut numbered = Vec::with_capacity(n);
    for (s, _, number) in &slices {
        let number = number.ok_or(VolumeError::NoSliceOrder {
            why: "no Instance Number",
        })?;
        numbered.push((number, *s));
    }
    numbered.sort_by_key(|(number, _)| *number);
    if numbered.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(VolumeError::NoSliceOrder {
            why: "the same Instance Number twice",
        });
    }
    Ok(VolumePlan {
        slices: numbered.into_iter().map(|(_, s)| s).collect(),
        order: SliceOrder::InstanceNumber,
        spacing_mm: None,
    })
}

fn by_position(
    slices: &[(SliceRef, &SliceGeometry, Option<i64>)],
) -> Result<VolumePlan, VolumeError> {
    let first = slices[0].1.orientation.expect("checked");
    for (index, (_, g, _)) in slices.iter().enumerate().skip(1) {
        let o = g.orientation.expect("checked");
        if o.iter()
            .zip(&first)
            .any(|(a, b)| (a - b).abs() > ORIENTATION_TOLERANCE)
        {
            return Err(VolumeError::MixedOrientation { index });
        }
    }
    let (r, c) = (
        [first[0], first[1], first[2]],
        [first[3], first[4], first[5]],
    );
    // PS3.3 C.7.6.2.1.1: two orthogonal unit vectors (within what six-digit cosines
    // round to). Scaled or skewed ones gave positions of another scale, and huge ones
    // overflowed into NaN that passed every check below, the slices then taken in arrival
    // order and labelled "position" (a red-team finding).
    let dot = |a: &[f64; 3], b: &[f64; 3]| a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
    if !((dot(&r, &r).sqrt() - 1.0).abs() <= UNIT_TOLERANCE
        && (dot(&c, &c).sqrt() - 1.0).abs() <= UNIT_TOLERANCE
        && dot(&r, &c).abs() <= UNIT_TOLERANCE)
    {
        return Err(VolumeError::DegenerateOrientation);
    }
    let normal = [
        r[1] * c[2] - r[2] * c[1],
        r[2] * c[0] - r[0] * c[2],
        r[0] * c[1] - r[1] * c[0],
    ];
    let length = normal.iter().map(|v| v * v).sum::<f64>().sqrt();
    if !length.is_finite() || length <= 0.5 {
        return Err(VolumeError::DegenerateOrientation);
    }
    let mut placed: Vec<(f64, SliceRef)> = slices
        .iter()
        .map(|(s, g, _)| {
            let p = g.position.expect("checked");
            let d = (p[0] * normal[0] + p[1] * normal[1] + p[2] * normal[2]) / length;
            (d, *s)
        })
        .collect();
    if placed.iter().any(|(d, _)| !d.is_finite()) {
        return Err(VolumeError::PositionOverflow);
    }
    // Stable: equal positions keep their order (and are refused just below).
    placed.sort_by(|a, b| a.0.total_cmp(&b.0));
    let gaps: Vec<f64> = placed.windows(2).map(|w| w[1].0 - w[0].0).collect();
    if gaps.iter().any(|g| !g.is_finite()) {
        return Err(VolumeError::PositionOverflow);
    }
    if let Some(&gap) = gaps.iter().find(|g| **g < DUPLICATE_GAP_MM) {
        return Err(VolumeError::DuplicatePosition { gap_mm: gap });
    }
    let spacing_mm = if gaps.is_empty() {
        None
    } else {
        let mut sorted = gaps.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[(sorted.len() - 1) / 2];
        let (min, max) = (sorted[0], sorted[sorted.len() - 1]);
        if gaps
            .iter()
            .any(|g| (g - median).abs() > 0.1 * median + 0.01)
        {
            return Err(VolumeError::UnevenSpacing {
                min_mm: min,
                max_mm: max,
                median_mm: median,
            });
        }
        Some(median)
    };
    Ok(VolumePlan {
        slices: placed.into_iter().map(|(_, s)| s).collect(),
        order: SliceOrder::Position,
        spacing_mm,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const AXIAL: [f64; 6] = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0];

    fn at(z: f64, orientation: [f64; 6], number: i64) -> InstanceGeometry {
        InstanceGeometry {
            frames: vec![SliceGeometry {
                position: Some([-100.0, -120.0, z]),
                orientation: Some(orientation),
                rescale: None,
            }],
            instance_number: Some(number),
        }
    }

    fn order(plan: &VolumePlan) -> Vec<(usize, u32)> {
        plan.slices.iter().map(|s| (s.instance, s.frame)).collect()
    }

    #[test]
    fn single_frames_go_in_position_order_along_the_normal() {
        // Arrival order 2, 0, 3, 1 by z; instance numbers say otherwise (ignored).
        let series = [
            at(10.0, AXIAL, 1),
            at(0.0, AXIAL, 2),
            at(15.0, AXIAL, 3),
            at(5.0, AXIAL, 4),
        ];
        let plan = plan_volume(&series, 2, 10).unwrap();
        assert_eq!(order(&plan), vec![(1, 0), (3, 0), (0, 0), (2, 0)]);
        assert_eq!(plan.order, SliceOrder::Position);
        assert_eq!(plan.spacing_mm, Some(5.0));
        assert_eq!(plan.middle().instance, 3);
        // A normal pointing the other way (rows -x): the order flips.
        let flipped = [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0];
        let series: Vec<_> = series
            .iter()
            .map(|i| InstanceGeometry {
                frames: vec![SliceGeometry {
                    orientation: Some(flipped),
                    ..i.frames[0].clone()
                }],
                ..i.clone()
            })
            .collect();
        let plan = plan_volume(&series, 2, 10).unwrap();
        assert_eq!(order(&plan), vec![(2, 0), (0, 0), (3, 0), (1, 0)]);
    }

    /// Red-team findings: cosines scaled (2, or 1e200) or skewed were taken as a direction,
    /// and positions whose projection overflows gave NaN gaps that passed the duplicate and
    /// spacing checks (the slices then in arrival order, labelled "position").
    #[test]
    fn cosines_must_be_orthogonal_unit_vectors_and_positions_finite() {
        let reason = |series: &[InstanceGeometry]| plan_volume(series, 2, 10).unwrap_err();
        for bad in [
            [2.0, 0.0, 0.0, 0.0, 2.0, 0.0],
            [1e200, 0.0, 0.0, 0.0, 1e200, 0.0],
            [1.0, 0.0, 0.0, 0.6, 0.8, 0.0],
        ] {
            let series = [at(0.0, bad, 1), at(2.0, bad, 2), at(4.0, bad, 3)];
            assert_eq!(
                reason(&series),
                VolumeError::DegenerateOrientation,
                "{bad:?}"
            );
        }
        // Six-digit cosines of an oblique plane are fine.
        let oblique = [1.0, 0.0, 0.0, 0.0, 0.600001, 0.799999];
        assert!(plan_volume(&[at(0.0, oblique, 1), at(2.0, oblique, 2)], 2, 10).is_ok());
        let far = |y: f64, n: i64| InstanceGeometry {
            frames: vec![SliceGeometry {
                position: Some([0.0, -1.7e308, y]),
                orientation: Some(oblique),
                rescale: None,
            }],
            instance_number: Some(n),
        };
        assert_eq!(
            reason(&[far(1.7e308, 1), far(1.7e308, 2), far(1.7e308, 3)]),
            VolumeError::PositionOverflow
        );
    }

    #[test]
    fn a_tilted_sagittal_stack_projects_on_its_own_normal() {
        // Sagittal: rows along y, columns along -z; the normal is -x... (y × -z = -x).
        let sagittal = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0];
        let series: Vec<_> = [3.0, 1.0, 2.0]
            .iter()
            .enumerate()
            .map(|(i, &x)| InstanceGeometry {
                frames: vec![SliceGeometry {
                    position: Some([x, 7.0 * i as f64, 0.5]),
                    orientation: Some(sagittal),
                    rescale: None,
                }],
                instance_number: None,
            })
            .collect();
        let plan = plan_volume(&series, 2, 10).unwrap();
        // Ascending along -x: x = 3, 2, 1.
        assert_eq!(order(&plan), vec![(0, 0), (2, 0), (1, 0)]);
        assert_eq!(plan.spacing_mm, Some(1.0));
    }

    #[test]
    fn series_that_cannot_be_a_volume_say_why() {
        let ok = [at(0.0, AXIAL, 1), at(2.0, AXIAL, 2), at(4.0, AXIAL, 3)];
        assert!(plan_volume(&ok, 2, 3).is_ok());
        let reason = |series: &[InstanceGeometry]| plan_volume(series, 2, 10).unwrap_err().reason();

        let coronal = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0];
        assert_eq!(
            reason(&[at(0.0, AXIAL, 1), at(2.0, coronal, 2)]),
            "mixed_orientation"
        );
        assert_eq!(
            reason(&[at(0.0, AXIAL, 1), at(2.0, AXIAL, 2), at(2.0, AXIAL, 3)]),
            "duplicate_position"
        );
        // 0, 2, 4, 8: the slice at 6 is missing.
        assert_eq!(
            reason(&[
                at(0.0, AXIAL, 1),
                at(2.0, AXIAL, 2),
                at(4.0, AXIAL, 3),
                at(8.0, AXIAL, 4)
            ]),
            "uneven_spacing"
        );
        assert_eq!(
            reason(&[
                at(0.0, [1.0, 0.0, 0.0, 1.0, 0.0, 0.0], 1),
                at(1.0, AXIAL, 2)
            ]),
            "mixed_orientation"
        );
        assert_eq!(
            plan_volume(&ok, 4, 10).unwrap_err(),
            VolumeError::TooFewSlices { slices: 3, min: 4 }
        );
        assert_eq!(
            plan_volume(&ok, 1, 2).unwrap_err().reason(),
            "too_many_slices"
        );
        // One slice without a position among placed ones.
        let mut partial = ok.clone();
        partial[1].frames[0].position = None;
        assert_eq!(reason(&partial), "incomplete_geometry");
        // A multi-frame object with another instance, or two multi-frame objects.
        let two_frames = InstanceGeometry {
            frames: vec![SliceGeometry::default(); 2],
            instance_number: Some(9),
        };
        assert_eq!(
            plan_volume(&[two_frames.clone(), at(0.0, AXIAL, 1)], 1, 10).unwrap_err(),
            VolumeError::MultiFrameMixed {
                multi_frame: 1,
                instances: 2
            }
        );
        assert_eq!(
            reason(&[two_frames.clone(), two_frames.clone()]),
            "multiframe_mixed"
        );
        // No positions: instance numbers, which must be there and distinct.
        let bare = |n: Option<i64>| InstanceGeometry {
            frames: vec![SliceGeometry::default()],
            instance_number: n,
        };
        assert_eq!(reason(&[bare(Some(1)), bare(None)]), "no_slice_order");
        assert_eq!(reason(&[bare(Some(1)), bare(Some(1))]), "no_slice_order");
        for e in [
            VolumeError::TooFewSlices { slices: 1, min: 2 },
            VolumeError::UnevenSpacing {
                min_mm: 1.0,
                max_mm: 2.0,
                median_mm: 1.0,
            },
        ] {
            assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn without_positions_instance_numbers_or_frame_order() {
        let bare = |n: i64| InstanceGeometry {
            frames: vec![SliceGeometry::default()],
            instance_number: Some(n),
        };
        let plan = plan_volume(&[bare(3), bare(1), bare(2)], 2, 10).unwrap();
        assert_eq!(order(&plan), vec![(1, 0), (2, 0), (0, 0)]);
        assert_eq!(plan.order, SliceOrder::InstanceNumber);
        let multi = InstanceGeometry {
            frames: vec![SliceGeometry::default(); 4],
            instance_number: None,
        };
        let plan = plan_volume(&[multi], 2, 10).unwrap();
        assert_eq!(order(&plan), vec![(0, 0), (0, 1), (0, 2), (0, 3)]);
        assert_eq!(plan.order, SliceOrder::FrameOrder);
        assert_eq!(plan.middle().frame, 1);
    }

    #[test]
    fn a_multi_frame_object_is_ordered_by_its_frame_positions() {
        // Frames stored head to feet; the volume goes feet to head; rescale per frame kept.
        let frames = (0..3)
            .map(|f| SliceGeometry {
                position: Some([0.0, 0.0, 30.0 - 10.0 * f as f64]),
                orientation: Some(AXIAL),
                rescale: Some((1.0, -1024.0 + f as f64)),
            })
            .collect();
        let plan = plan_volume(
            &[InstanceGeometry {
                frames,
                instance_number: Some(1),
            }],
            2,
            10,
        )
        .unwrap();
        assert_eq!(order(&plan), vec![(0, 2), (0, 1), (0, 0)]);
        assert_eq!(plan.slices[0].rescale, Some((1.0, -1022.0)));
        assert_eq!(plan.spacing_mm, Some(10.0));
    }
}
