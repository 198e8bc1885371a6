//! Pixel decode: a stored instance (a Part 10 file or an in-memory object) becomes per-frame
//! `f32` images the preprocessing in `nightingale_models::preprocess` takes, frame by frame
//! (bounded memory) or as one volume.
//!
//! What is done, in DICOM's order (PS3.4 N.2.1):
//!
//! 1. decode the frame, one frame's fragments at a time: native data here (BitsAllocated 1, 8
//!    or 16, either planar configuration, big or little endian, deflated), RLE here, JPEG
//!    (baseline, 8-bit extended, lossless) with `jpeg-decoder` and JPEG 2000 with `jpeg2k`
//!    (the pure-Rust OpenJPEG port): the codecs `dicom-pixeldata` 0.10.1 uses, called
//!    directly because its adapters panic when a frame is smaller than the header says
//!    (index out of bounds), its JPEG adapter copies the whole pixel sequence for every
//!    frame, and it ignores the Photometric Interpretation for colour JPEG. Other syntaxes its
//!    registry can decode go through `dicom-pixeldata`. No JPEG-LS in this build (the
//!    `charls` codec needs cmake); no 12-bit JPEG. Values are the stored values, masked to
//!    BitsStored and sign-extended as PixelRepresentation says (what pydicom's `pixel_array`
//!    returns);
//! 2. colour: YBR_FULL and YBR_FULL_422 become RGB (pydicom's conversion, to 8 bits), PALETTE
//!    COLOR is looked up to RGB; [`Colour::Grey`] reduces RGB to luma;
//! 3. Modality LUT (rescale slope/intercept) when [`DecodeOptions::modality_lut`] asks;
//!    otherwise the frame carries `slope`/`intercept` for the preprocessing to apply;
//! 4. VOI LUT (window centre/width, or the VOI LUT Sequence) when [`DecodeOptions::voi`] asks:
//!    the values become 0–1;
//! 5. MONOCHROME1 inverted when [`DecodeOptions::invert_monochrome1`] asks; otherwise the frame
//!    says `monochrome1` and the preprocessing inverts after its window (as the training code).
//!
//! A [`Frame`] maps field for field onto `nightingale_models::preprocess::Image`
//! (`rows, cols, samples, data: &frame.data, slope, intercept, monochrome1`).
//!
//! Nothing here panics on a hostile header: every attribute is checked (and the pixel count
//! limited, from the header alone, BEFORE anything is decoded) before `dicom-pixeldata` is
//! called; its codecs run under `catch_unwind` as the last resort ([`PixelError::CodecPanicked`]).
//! [`DecodeBudget`] bounds how many pixels are being decoded at once across the pipeline.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dicom_core::Tag;
use dicom_core::header::HasLength;
use dicom_core::value::{PrimitiveValue, Value};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::{DefaultDicomObject, InMemDicomObject};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

/// The largest frame accepted by default, in pixels: the limit of
/// `nightingale_models::preprocess::MAX_PIXELS` (64 Mi).
pub const MAX_FRAME_PIXELS: u64 = 64 << 20;

/// JPEG Extended (Process 2 & 4): only its 8-bit form decodes in this build.
pub const JPEG_EXTENDED: &str = "1.2.840.10008.1.2.4.51";
/// RLE Lossless.
pub const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";

/// Why an instance could not be decoded. [`reason`](Self::reason) is a stable short code for
/// metrics and the results API; no message carries patient data.
#[derive(Debug, thiserror::Error)]
pub enum PixelError {
    #[error("cannot read the DICOM file")]
    Open {
        #[source]
        source: Box<dicom_object::ReadError>,
    },
    /// Image attributes repeated after the pixel data say otherwise than those before it:
    /// the checks made on the header (frames, photometric interpretation) would not hold
    /// for the pixels decoded.
    #[error(
        "the image attributes after the pixel data differ from those before it (frames, size or photometric interpretation given twice)"
    )]
    HeaderAfterPixelData,
    #[error("attribute {name} is missing")]
    MissingAttribute { name: &'static str },
    #[error("attribute {name} has an invalid value")]
    InvalidAttribute { name: &'static str },
    #[error(
        "the top-level Rescale Slope/Intercept and the functional groups' Pixel Value \
         Transformation disagree"
    )]
    ConflictingRescale,
    #[error("the instance has no pixel data")]
    NoPixelData,
    #[error("transfer syntax {uid} cannot be decoded by this build: {why}")]
    UnsupportedTransferSyntax { uid: String, why: &'static str },
    #[error("BitsAllocated {bits} is not supported (1, 8 or 16 are)")]
    UnsupportedBitsAllocated { bits: u16 },
    #[error(
        "photometric interpretation {photometric} with {samples} samples per pixel is not supported"
    )]
    UnsupportedPhotometric { photometric: String, samples: u16 },
    #[error("{what} is not supported")]
    UnsupportedLut { what: &'static str },
    #[error("{rows} x {cols} x {frames} frames is {pixels} pixels; at most {limit} are accepted")]
    TooManyPixels {
        rows: u32,
        cols: u32,
        frames: u32,
        pixels: u64,
        limit: u64,
    },
    #[error("{frames} frames; at most {limit} are accepted")]
    TooManyFrames { frames: u32, limit: u32 },
    #[error("frame {frame} is out of range (the object has {frames})")]
    FrameOutOfRange { frame: u32, frames: u32 },
    #[error("the pixel data holds {got} bytes; the header needs {needed}")]
    PixelDataTooShort { needed: u64, got: u64 },
    #[error("frame {frame} could not be decoded")]
    Decode {
        frame: u32,
        #[source]
        source: dicom_pixeldata::Error,
    },
    #[error("JPEG frame {frame} could not be decoded")]
    DecodeJpeg {
        frame: u32,
        #[source]
        source: jpeg_decoder::Error,
    },
    #[error("JPEG 2000 frame {frame} could not be decoded")]
    DecodeJ2k {
        frame: u32,
        #[source]
        source: jpeg2k::error::Error,
    },
    #[error("the fragments of frame {frame} cannot be found")]
    FrameFragments { frame: u32 },
    #[error("RLE frame {frame} does not hold the segments its header needs")]
    RleFrame { frame: u32 },
    #[error("the codec failed (panicked) on frame {frame}")]
    CodecPanicked { frame: u32 },
    /// A JPEG frame whose own frame header (SOF) declares another size or component count
    /// than the DICOM header: refused before any of it is decoded (jpeg-decoder allocates
    /// and fills the declared size whatever data follows: 1 KB declaring 30000 x 30000 took
    /// about 1 GB and 30 s of CPU).
    #[error(
        "frame {frame} is a JPEG of {width} x {height} with {components} component(s); the header says {cols} x {rows} with {samples}"
    )]
    JpegSize {
        frame: u32,
        width: u16,
        height: u16,
        components: usize,
        cols: u32,
        rows: u32,
        samples: u16,
    },
    #[error("frame {frame} decoded to {got} bytes; the header says {expected}")]
    DecodedSize {
        frame: u32,
        expected: usize,
        got: usize,
    },
    #[error("instance {index} of the series differs in {attribute} ({first} vs {other})")]
    MixedSeries {
        index: usize,
        attribute: &'static str,
        first: String,
        other: String,
    },
    #[error("frame {frame}: no JPEG 2000 codestream with a whole SIZ marker segment")]
    J2kNoSiz { frame: u32 },
    #[error(
        "frame {frame}: the JPEG 2000 codestream is {width} x {height} with {components} \
         component(s) (of that size); the header says {cols} x {rows} with {samples}"
    )]
    J2kSize {
        frame: u32,
        width: u32,
        height: u32,
        components: usize,
        cols: u32,
        rows: u32,
        samples: u16,
    },
    /// The instances do not share a patient, modality or SOP class: named, values not shown.
    #[error("instance {index} of the series differs from the first in {attribute}")]
    MixedIdentity {
        index: usize,
        attribute: &'static str,
    },
    #[error("no decode budget within {waited:?}")]
    BudgetTimeout { waited: Duration },
}

impl PixelError {
    /// A stable code for the failure's kind (metrics labels, the results API, tests).
    pub fn reason(&self) -> &'static str {
        match self {
            PixelError::Open { .. } => "unreadable",
            PixelError::HeaderAfterPixelData => "header_after_pixel_data",
            PixelError::MissingAttribute { .. } | PixelError::InvalidAttribute { .. } => {
                "bad_attribute"
            }
            PixelError::NoPixelData => "no_pixel_data",
            PixelError::ConflictingRescale => "conflicting_rescale",
            PixelError::UnsupportedTransferSyntax { .. } => "unsupported_transfer_syntax",
            PixelError::UnsupportedBitsAllocated { .. } => "unsupported_bits_allocated",
            PixelError::UnsupportedPhotometric { .. } => "unsupported_photometric",
            PixelError::UnsupportedLut { .. } => "unsupported_lut",
            PixelError::TooManyPixels { .. } => "too_many_pixels",
            PixelError::TooManyFrames { .. } => "too_many_frames",
            PixelError::FrameOutOfRange { .. } => "frame_out_of_range",
            PixelError::PixelDataTooShort { .. } => "pixel_data_too_short",
            PixelError::Decode { .. }
            | PixelError::DecodeJpeg { .. }
            | PixelError::RleFrame { .. }
            | PixelError::DecodeJ2k { .. }
            | PixelError::J2kNoSiz { .. }
            | PixelError::FrameFragments { .. }
            | PixelError::CodecPanicked { .. } => "decode_failed",
            PixelError::DecodedSize { .. }
            | PixelError::J2kSize { .. }
            | PixelError::JpegSize { .. } => "decoded_size",
            PixelError::MixedSeries { .. } | PixelError::MixedIdentity { .. } => "mixed_series",
            PixelError::BudgetTimeout { .. } => "budget_timeout",
        }
    }
}

/// The photometric interpretations understood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Photometric {
    Monochrome1,
    Monochrome2,
    Rgb,
    YbrFull,
    YbrFull422,
    /// JPEG 2000 irreversible / reversible colour: the codec returns RGB.
    YbrIct,
    YbrRct,
    Palette,
}

impl Photometric {
    fn parse(s: &str) -> Option<Self> {
        Some(match s.trim_end_matches(['\0', ' ']) {
            "MONOCHROME1" => Photometric::Monochrome1,
            "MONOCHROME2" => Photometric::Monochrome2,
            "RGB" => Photometric::Rgb,
            "YBR_FULL" => Photometric::YbrFull,
            "YBR_FULL_422" => Photometric::YbrFull422,
            "YBR_ICT" => Photometric::YbrIct,
            "YBR_RCT" => Photometric::YbrRct,
            "PALETTE COLOR" => Photometric::Palette,
            _ => return None,
        })
    }

    /// The DICOM code string.
    pub fn as_str(self) -> &'static str {
        match self {
            Photometric::Monochrome1 => "MONOCHROME1",
            Photometric::Monochrome2 => "MONOCHROME2",
            Photometric::Rgb => "RGB",
            Photometric::YbrFull => "YBR_FULL",
            Photometric::YbrFull422 => "YBR_FULL_422",
            Photometric::YbrIct => "YBR_ICT",
            Photometric::YbrRct => "YBR_RCT",
            Photometric::Palette => "PALETTE COLOR",
        }
    }

    fn samples(self) -> u16 {
        match self {
            Photometric::Monochrome1 | Photometric::Monochrome2 | Photometric::Palette => 1,
            _ => 3,
        }
    }
}

/// A window from the header (modality units) with its VOI LUT Function.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WindowLevel {
    pub center: f64,
    pub width: f64,
    pub function: VoiFunction,
}

/// VOI LUT Function (0028,1056).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VoiFunction {
    #[default]
    Linear,
    LinearExact,
    Sigmoid,
}

/// The image attributes of an instance, read and checked without touching the pixel data.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageHeader {
    pub transfer_syntax: String,
    pub rows: u32,
    pub cols: u32,
    pub samples: u16,
    pub bits_allocated: u16,
    pub bits_stored: u16,
    pub signed: bool,
    /// PlanarConfiguration 1: colour planes one after the other (native data only).
    pub planar: bool,
    pub photometric: Photometric,
    pub frames: u32,
    /// Rescale Slope / Intercept (1 and 0 when absent).
    pub slope: f64,
    pub intercept: f64,
    /// The first Window Center/Width pair, if any.
    pub window: Option<WindowLevel>,
    /// A Modality LUT Sequence is present (not applied: [`PixelError::UnsupportedLut`]).
    pub modality_lut_sequence: bool,
    /// A VOI LUT Sequence is present.
    pub voi_lut_sequence: bool,
    /// Presentation LUT Shape (2050,0020) is `INVERSE`: a grey image displayed inverted, as
    /// MONOCHROME1 is (PS3.3 C.11.6.1.2; with MONOCHROME1 it names the same inversion, not
    /// a second one, C.8.11.6.1). A MONOCHROME2 image so marked was shown and processed
    /// uninverted, unlike its MONOCHROME1 twin (a review's finding).
    pub presentation_inverse: bool,
    /// The patient, modality and SOP class, which every instance of a series must share
    /// ([`check_series`]); values never shown.
    pub identity: crate::series::SeriesIdentity,
}

impl ImageHeader {
    /// Reads and checks the image attributes of `obj` (a full object or one read up to the
    /// pixel data). `limits` are checked here, before any decoding.
    pub fn from_object(obj: &DefaultDicomObject, limits: &Limits) -> Result<Self, PixelError> {
        let ts = obj
            .meta()
            .transfer_syntax()
            .trim_end_matches(['\0', ' '])
            .to_owned();
        let header = Self::from_dataset(obj, ts)?;
        header.check(limits)?;
        Ok(header)
    }

    fn from_dataset(obj: &InMemDicomObject, transfer_syntax: String) -> Result<Self, PixelError> {
        let rows = required_int::<u32>(obj, tags::ROWS, "Rows")?;
        let cols = required_int::<u32>(obj, tags::COLUMNS, "Columns")?;
        let samples =
            optional_int::<u16>(obj, tags::SAMPLES_PER_PIXEL, "SamplesPerPixel")?.unwrap_or(1);
        let bits_allocated = required_int::<u16>(obj, tags::BITS_ALLOCATED, "BitsAllocated")?;
        let bits_stored =
            optional_int::<u16>(obj, tags::BITS_STORED, "BitsStored")?.unwrap_or(bits_allocated);
        let signed = optional_int::<u16>(obj, tags::PIXEL_REPRESENTATION, "PixelRepresentation")?
            .unwrap_or(0)
            == 1;
        let planar = optional_int::<u16>(obj, tags::PLANAR_CONFIGURATION, "PlanarConfiguration")?
            .unwrap_or(0)
            == 1;
        let pi = optional_str(obj, tags::PHOTOMETRIC_INTERPRETATION).ok_or(
            PixelError::MissingAttribute {
                name: "PhotometricInterpretation",
            },
        )?;
        let photometric =
            Photometric::parse(&pi).ok_or_else(|| PixelError::UnsupportedPhotometric {
                photometric: printable(&pi),
                samples,
            })?;
        let frames =
            optional_int::<i64>(obj, tags::NUMBER_OF_FRAMES, "NumberOfFrames")?.unwrap_or(1);
        let frames =
            u32::try_from(frames)
                .ok()
                .filter(|&f| f >= 1)
                .ok_or(PixelError::InvalidAttribute {
                    name: "NumberOfFrames",
                })?;
        let slope = optional_float(obj, tags::RESCALE_SLOPE, "RescaleSlope")?.unwrap_or(1.0);
        let intercept =
            optional_float(obj, tags::RESCALE_INTERCEPT, "RescaleIntercept")?.unwrap_or(0.0);
        if !(slope.is_finite() && slope != 0.0) {
            return Err(PixelError::InvalidAttribute {
                name: "RescaleSlope",
            });
        }
        if !intercept.is_finite() {
            return Err(PixelError::InvalidAttribute {
                name: "RescaleIntercept",
            });
        }
        if !rescale_keeps_the_range(bits_stored, signed, slope, intercept) {
            return Err(PixelError::InvalidAttribute {
                name: "RescaleSlope/RescaleIntercept",
            });
        }
        let window = window_of(obj);
        Ok(ImageHeader {
            transfer_syntax,
            rows,
            cols,
            samples,
            bits_allocated,
            bits_stored,
            signed,
            planar,
            photometric,
            frames,
            slope,
            intercept,
            window,
            modality_lut_sequence: has(obj, tags::MODALITY_LUT_SEQUENCE),
            voi_lut_sequence: has(obj, tags::VOILUT_SEQUENCE),
            presentation_inverse: optional_str(obj, tags::PRESENTATION_LUT_SHAPE)
                .is_some_and(|s| s.trim() == "INVERSE"),
            identity: crate::series::SeriesIdentity::of(obj),
        })
    }

    /// Whether the image is displayed inverted (its low values white): MONOCHROME1, or a
    /// MONOCHROME2 image whose Presentation LUT Shape is INVERSE.
    pub fn displays_inverted(&self) -> bool {
        self.photometric == Photometric::Monochrome1
            || (self.photometric == Photometric::Monochrome2 && self.presentation_inverse)
    }

    /// Pixels per frame.
    pub fn frame_pixels(&self) -> u64 {
        u64::from(self.rows) * u64::from(self.cols)
    }

    /// Pixels in all frames.
    pub fn total_pixels(&self) -> u64 {
        self.frame_pixels() * u64::from(self.frames)
    }

    fn check(&self, limits: &Limits) -> Result<(), PixelError> {
        if self.rows == 0 {
            return Err(PixelError::InvalidAttribute { name: "Rows" });
        }
        if self.cols == 0 {
            return Err(PixelError::InvalidAttribute { name: "Columns" });
        }
        let too_many = |limit| PixelError::TooManyPixels {
            rows: self.rows,
            cols: self.cols,
            frames: self.frames,
            pixels: self.total_pixels(),
            limit,
        };
        if self.frame_pixels() > limits.max_frame_pixels {
            return Err(too_many(limits.max_frame_pixels));
        }
        if self.frames > limits.max_frames {
            return Err(PixelError::TooManyFrames {
                frames: self.frames,
                limit: limits.max_frames,
            });
        }
        if !matches!(self.bits_allocated, 1 | 8 | 16) {
            return Err(PixelError::UnsupportedBitsAllocated {
                bits: self.bits_allocated,
            });
        }
        if self.bits_stored == 0 || self.bits_stored > self.bits_allocated {
            return Err(PixelError::InvalidAttribute { name: "BitsStored" });
        }
        if self.samples != self.photometric.samples() {
            return Err(PixelError::UnsupportedPhotometric {
                photometric: self.photometric.as_str().to_owned(),
                samples: self.samples,
            });
        }
        if self.samples == 3 && self.bits_allocated == 1 {
            return Err(PixelError::UnsupportedBitsAllocated { bits: 1 });
        }
        if self.photometric == Photometric::YbrFull422 && self.cols % 2 == 1 && !self.encapsulated()
        {
            return Err(PixelError::InvalidAttribute { name: "Columns" });
        }
        let ts = TransferSyntaxRegistry
            .get(&self.transfer_syntax)
            .ok_or_else(|| PixelError::UnsupportedTransferSyntax {
                uid: printable(&self.transfer_syntax),
                why: "unknown transfer syntax",
            })?;
        if !ts.can_decode_all() {
            return Err(PixelError::UnsupportedTransferSyntax {
                uid: self.transfer_syntax.clone(),
                why: "no codec in this build (JPEG-LS needs the charls feature)",
            });
        }
        if ts.is_encapsulated_pixel_data() {
            if self.bits_allocated == 1 {
                return Err(PixelError::UnsupportedBitsAllocated { bits: 1 });
            }
            if self.transfer_syntax == JPEG_EXTENDED && self.bits_stored > 8 {
                return Err(PixelError::UnsupportedTransferSyntax {
                    uid: self.transfer_syntax.clone(),
                    why: "12-bit JPEG extended has no pure-Rust decoder",
                });
            }
        }
        Ok(())
    }

    fn encapsulated(&self) -> bool {
        TransferSyntaxRegistry
            .get(&self.transfer_syntax)
            .is_some_and(|ts| ts.is_encapsulated_pixel_data())
    }

    /// The stored-value range `[lo, hi]` BitsStored and PixelRepresentation allow.
    pub fn stored_range(&self) -> (f64, f64) {
        let bits = i32::from(self.bits_stored);
        if self.signed {
            (-(2f64.powi(bits - 1)), 2f64.powi(bits - 1) - 1.0)
        } else {
            (0.0, 2f64.powi(bits) - 1.0)
        }
    }
}

/// Limits checked from the header before decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct Limits {
    /// Pixels in one frame (rows × columns).
    pub max_frame_pixels: u64,
    /// Pixels in a volume (rows × columns × frames) decoded at once by [`PixelSource::volume`].
    pub max_volume_pixels: u64,
    /// Frames in one object (frames are decoded one at a time, so this bounds work, not memory).
    pub max_frames: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_pixels: MAX_FRAME_PIXELS,
            max_volume_pixels: MAX_FRAME_PIXELS,
            max_frames: 4096,
        }
    }
}

/// Colour output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Colour {
    /// Colour images stay RGB (3 interleaved samples per pixel).
    #[default]
    Rgb,
    /// RGB becomes luma 0.299 R + 0.587 G + 0.114 B (as the preprocessing's step 1).
    Grey,
}

/// Which VOI transform to apply (after the Modality LUT, to 0–1).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Voi {
    /// None: values stay stored (or modality) values.
    #[default]
    None,
    /// The object's own: the VOI LUT Sequence if present, else its first window.
    /// An object with neither is an error ([`PixelError::MissingAttribute`]).
    FromObject,
    /// A given window (modality units), LINEAR.
    Window { center: f64, width: f64 },
}

/// How to decode.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct DecodeOptions {
    /// Apply rescale slope/intercept (the frame then says slope 1, intercept 0).
    pub modality_lut: bool,
    /// Apply a VOI LUT (implies the Modality LUT); values become 0–1.
    pub voi: Voi,
    /// Invert MONOCHROME1 (the frame then says `monochrome1 = false`): on 0–1 values
    /// x → 1 − x, otherwise x → lo + hi − x over the stored range (mapped by the Modality LUT
    /// when applied).
    pub invert_monochrome1: bool,
    pub colour: Colour,
    pub limits: Limits,
}

/// What the values of a [`Frame`] are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Values {
    /// Stored values (palette and YBR already RGB).
    Stored,
    /// Modality values (rescaled).
    Modality,
    /// After a VOI LUT: 0–1.
    Voi,
}

/// One decoded frame.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    pub index: u32,
    pub rows: usize,
    pub cols: usize,
    /// 1 (grey) or 3 (interleaved RGB).
    pub samples: usize,
    /// Row-major, `rows × cols × samples` values.
    pub data: Vec<f32>,
    /// The rescale still to apply (1 and 0 once applied).
    pub slope: f64,
    pub intercept: f64,
    /// MONOCHROME1 still to invert.
    pub monochrome1: bool,
    pub values: Values,
    /// The header's window (modality units), for display.
    pub window: Option<WindowLevel>,
    /// BitsStored of the source (colour images: bits per channel after decoding).
    pub bits_stored: u16,
}

/// All frames at once: `frames × rows × cols × samples` values.
#[derive(Clone, Debug, PartialEq)]
pub struct Volume {
    pub frames: usize,
    pub rows: usize,
    pub cols: usize,
    pub samples: usize,
    pub data: Vec<f32>,
    pub slope: f64,
    pub intercept: f64,
    pub monochrome1: bool,
    pub values: Values,
}

/// A decodable instance: the object and its checked header.
pub struct PixelSource {
    obj: DefaultDicomObject,
    header: ImageHeader,
    /// Per frame, the functional groups' rescale where an enhanced object has one (it
    /// replaces the header's Rescale Slope/Intercept for that frame); empty otherwise.
    rescale: Vec<Option<(f64, f64)>>,
    /// Per frame, the functional groups' Frame VOI LUT window where an enhanced object has
    /// one (it replaces the header's Window Center/Width for that frame); empty otherwise.
    windows: Vec<Option<WindowLevel>>,
}

impl std::fmt::Debug for PixelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PixelSource")
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// Reads only the header of a Part 10 file (up to the pixel data) and checks it.
pub fn read_header(path: &Path, limits: &Limits) -> Result<ImageHeader, PixelError> {
    let obj =
        crate::meta::open_file(path, Some(tags::PIXEL_DATA)).map_err(|e| PixelError::Open {
            source: Box::new(e),
        })?;
    ImageHeader::from_object(&obj, limits)
}

impl PixelSource {
    /// Opens a Part 10 file: the header is read and checked first, so an image over the
    /// limits is refused before its pixel data is read into memory.
    pub fn open(path: &Path, limits: &Limits) -> Result<Self, PixelError> {
        let before = read_header(path, limits)?;
        let obj = crate::meta::open_file(path, None).map_err(|e| PixelError::Open {
            source: Box::new(e),
        })?;
        let source = Self::from_object(obj, limits)?;
        // What routing, `max_frames` and validation's one-frame rule read is the header up
        // to the pixel data; a Number of Frames of 4096 appended after it made a "one-frame"
        // file decode as 4,096 frames (a re-attack's finding).
        if source.header != before {
            return Err(PixelError::HeaderAfterPixelData);
        }
        Ok(source)
    }

    /// An object already in memory.
    pub fn from_object(obj: DefaultDicomObject, limits: &Limits) -> Result<Self, PixelError> {
        let header = ImageHeader::from_object(&obj, limits)?;
        let rescale = crate::volume::frame_rescales(&obj, header.frames)?;
        // A frame's own rescale is held to what the header's is (a per-frame slope of 1e308
        // preprocessed the volume to a constant and gave a blank image's probability: a
        // red-team finding).
        if rescale
            .iter()
            .flatten()
            .any(|&(s, b)| !rescale_keeps_the_range(header.bits_stored, header.signed, s, b))
        {
            return Err(PixelError::InvalidAttribute {
                name: "PixelValueTransformationSequence",
            });
        }
        // A top-level Rescale Slope/Intercept beside functional groups that say otherwise
        // (a classic CT carrying a stray Per-Frame Functional Groups item with slope -1) is
        // refused: which one the sender meant cannot be told, and one of them inverts the
        // image (a red-team finding: the functional group won, silently).
        let top_level = [tags::RESCALE_SLOPE, tags::RESCALE_INTERCEPT]
            .iter()
            .any(|&t| obj.element_opt(t).ok().flatten().is_some());
        if top_level
            && rescale
                .iter()
                .flatten()
                .any(|&fg| fg != (header.slope, header.intercept))
        {
            return Err(PixelError::ConflictingRescale);
        }
        let windows = crate::volume::frame_windows(&obj, header.frames);
        let source = PixelSource {
            obj,
            header,
            rescale,
            windows,
        };
        source.check_pixel_data()?;
        Ok(source)
    }

    pub fn header(&self) -> &ImageHeader {
        &self.header
    }

    /// For a caller that computes modality values itself from the frames' stored values,
    /// slope and intercept (a model's preprocessing): refuses a grey image whose modality
    /// transform is a Modality LUT Sequence, which those cannot carry (it was ignored: the
    /// pipeline scored an image whose LUT inverted it as if it had none, a red-team finding
    /// against pydicom's `apply_modality_lut`).
    pub fn refuse_modality_lut_sequence(&self) -> Result<(), PixelError> {
        let h = &self.header;
        if h.samples == 1 && h.photometric != Photometric::Palette && h.modality_lut_sequence {
            return Err(PixelError::UnsupportedLut {
                what: "Modality LUT Sequence",
            });
        }
        Ok(())
    }

    pub fn object(&self) -> &DefaultDicomObject {
        &self.obj
    }

    fn check_pixel_data(&self) -> Result<(), PixelError> {
        let h = &self.header;
        let element = self
            .obj
            .element_opt(tags::PIXEL_DATA)
            .ok()
            .flatten()
            .ok_or(PixelError::NoPixelData)?;
        match element.value() {
            Value::PixelSequence(seq) => {
                if !h.encapsulated() {
                    return Err(PixelError::InvalidAttribute { name: "PixelData" });
                }
                if seq.fragments().is_empty() {
                    return Err(PixelError::NoPixelData);
                }
                Ok(())
            }
            Value::Primitive(p) => {
                if h.encapsulated() {
                    return Err(PixelError::InvalidAttribute { name: "PixelData" });
                }
                let got = primitive_len(p);
                let needed = native_bytes(h, h.frames);
                if got < needed {
                    return Err(PixelError::PixelDataTooShort { needed, got });
                }
                Ok(())
            }
            Value::Sequence(_) => Err(PixelError::InvalidAttribute { name: "PixelData" }),
        }
    }

    /// Decodes frame `index` (0-based).
    pub fn frame(&self, index: u32, options: &DecodeOptions) -> Result<Frame, PixelError> {
        let h = &self.header;
        if index >= h.frames {
            return Err(PixelError::FrameOutOfRange {
                frame: index,
                frames: h.frames,
            });
        }
        let pixels = h.frame_pixels() as usize;
        // The frame's rescale: an enhanced object's functional groups, else the header's.
        let (slope, intercept) = self
            .rescale
            .get(index as usize)
            .copied()
            .flatten()
            .unwrap_or((h.slope, h.intercept));
        // Its window likewise (the Frame VOI LUT functional group, else the header's).
        let window = self
            .windows
            .get(index as usize)
            .copied()
            .flatten()
            .or(h.window);
        // 1. Stored values (colour interleaved), plus what colour conversion is still due.
        let (raw, pending) = if h.encapsulated() {
            self.decode_encapsulated(index)?
        } else {
            (self.read_native(index)?, h.photometric)
        };
        // 2. Colour.
        let (mut data, samples, bits) = match pending {
            Photometric::YbrFull => (ybr_full_to_rgb(&raw), 3, 8),
            Photometric::YbrFull422 => (ybr_full_to_rgb(&expand_422(&raw)), 3, 8),
            Photometric::Palette => {
                let palette = Palette::read(&self.obj)?;
                (palette.apply(&raw), 3, palette.bits)
            }
            p => (
                raw.iter().map(|&v| v as f32).collect::<Vec<f32>>(),
                usize::from(p.samples()),
                h.bits_stored,
            ),
        };
        if data.len() != pixels * samples {
            return Err(PixelError::DecodedSize {
                frame: index,
                expected: pixels * samples,
                got: data.len(),
            });
        }
        let mut frame = Frame {
            index,
            rows: h.rows as usize,
            cols: h.cols as usize,
            samples,
            data: Vec::new(),
            slope,
            intercept,
            monochrome1: h.displays_inverted(),
            values: Values::Stored,
            window,
            bits_stored: bits,
        };
        if samples == 3 && options.colour == Colour::Grey {
            data = data
                .chunks_exact(3)
                .map(|p| {
                    (0.299 * f64::from(p[0]) + 0.587 * f64::from(p[1]) + 0.114 * f64::from(p[2]))
                        as f32
                })
                .collect();
            frame.samples = 1;
        }
        let (mut lo, mut hi) = h.stored_range();
        // 3. Modality LUT (grey images only, as the standard has it).
        let grey_source = h.samples == 1 && h.photometric != Photometric::Palette;
        if grey_source && (options.modality_lut || options.voi != Voi::None) {
            if h.modality_lut_sequence {
                return Err(PixelError::UnsupportedLut {
                    what: "Modality LUT Sequence",
                });
            }
            let (s, i) = (slope, intercept);
            for x in &mut data {
                *x = (f64::from(*x) * s + i) as f32;
            }
            (lo, hi) = ((lo * s + i).min(hi * s + i), (lo * s + i).max(hi * s + i));
            frame.slope = 1.0;
            frame.intercept = 0.0;
            frame.values = Values::Modality;
        }
        // 4. VOI.
        if grey_source && options.voi != Voi::None {
            match options.voi {
                Voi::Window { center, width } => window01(
                    &mut data,
                    WindowLevel {
                        center,
                        width,
                        function: VoiFunction::Linear,
                    },
                )?,
                _ if h.voi_lut_sequence => VoiLut::read(&self.obj)?.apply(&mut data),
                _ => window01(
                    &mut data,
                    window.ok_or(PixelError::MissingAttribute {
                        name: "WindowCenter/WindowWidth",
                    })?,
                )?,
            }
            frame.values = Values::Voi;
            (lo, hi) = (0.0, 1.0);
        }
        // 5. MONOCHROME1.
        if frame.monochrome1 && options.invert_monochrome1 {
            let sum = (lo + hi) as f32;
            for x in &mut data {
                *x = sum - *x;
            }
            frame.monochrome1 = false;
        }
        frame.data = data;
        Ok(frame)
    }

    /// Every frame, one at a time (memory: one frame).
    pub fn frames<'a>(
        &'a self,
        options: &'a DecodeOptions,
    ) -> impl Iterator<Item = Result<Frame, PixelError>> + 'a {
        (0..self.header.frames).map(move |i| self.frame(i, options))
    }

    /// All frames as one volume (refused over [`Limits::max_volume_pixels`]). An enhanced
    /// object whose frames have different rescales (functional groups) gets modality values,
    /// since one slope and intercept cannot describe its stored values.
    pub fn volume(&self, options: &DecodeOptions) -> Result<Volume, PixelError> {
        let h = &self.header;
        let rescaled;
        let options = if !options.modality_lut && self.rescale.windows(2).any(|w| w[0] != w[1]) {
            rescaled = DecodeOptions {
                modality_lut: true,
                ..options.clone()
            };
            &rescaled
        } else {
            options
        };
        if h.total_pixels() > options.limits.max_volume_pixels {
            return Err(PixelError::TooManyPixels {
                rows: h.rows,
                cols: h.cols,
                frames: h.frames,
                pixels: h.total_pixels(),
                limit: options.limits.max_volume_pixels,
            });
        }
        let mut volume: Option<Volume> = None;
        for frame in self.frames(options) {
            let frame = frame?;
            let v = volume.get_or_insert_with(|| Volume {
                frames: h.frames as usize,
                rows: frame.rows,
                cols: frame.cols,
                samples: frame.samples,
                data: Vec::with_capacity(frame.data.len() * h.frames as usize),
                slope: frame.slope,
                intercept: frame.intercept,
                monochrome1: frame.monochrome1,
                values: frame.values,
            });
            v.data.extend_from_slice(&frame.data);
        }
        Ok(volume.expect("frames >= 1"))
    }

    fn read_native(&self, index: u32) -> Result<Vec<i64>, PixelError> {
        let h = &self.header;
        let element = self
            .obj
            .element(tags::PIXEL_DATA)
            .map_err(|_| PixelError::NoPixelData)?;
        let Value::Primitive(p) = element.value() else {
            return Err(PixelError::InvalidAttribute { name: "PixelData" });
        };
        let per_frame_samples = native_frame_samples(h) as usize;
        let start = per_frame_samples * index as usize;
        let mut out = Vec::with_capacity(per_frame_samples);
        match h.bits_allocated {
            1 => {
                let byte = |k: usize| primitive_byte(p, k);
                for s in start..start + per_frame_samples {
                    out.push(i64::from((byte(s / 8) >> (s % 8)) & 1));
                }
            }
            8 => {
                for k in start..start + per_frame_samples {
                    out.push(i64::from(primitive_byte(p, k)));
                }
            }
            _ => {
                for k in start..start + per_frame_samples {
                    let w = match p {
                        PrimitiveValue::U16(w) => w[k],
                        PrimitiveValue::I16(w) => w[k] as u16,
                        _ => u16::from_le_bytes([
                            primitive_byte(p, 2 * k),
                            primitive_byte(p, 2 * k + 1),
                        ]),
                    };
                    out.push(i64::from(w));
                }
            }
        }
        mask_all(&mut out, h);
        if h.samples == 3 && h.planar {
            out = interleave(&out);
        }
        Ok(out)
    }

    /// Decodes one encapsulated frame (JPEG, JPEG 2000 and RLE here, anything else the
    /// registry can decode with `dicom-pixeldata`); returns its samples (colour interleaved)
    /// and the colour conversion still due (the JPEG and JPEG 2000 codecs return RGB; RLE
    /// returns the stored colour space).
    fn decode_encapsulated(&self, index: u32) -> Result<(Vec<i64>, Photometric), PixelError> {
        let h = &self.header;
        let obj = &self.obj;
        // JPEG: jpeg-decoder directly on the frame's own fragments (dicom-pixeldata's JPEG
        // adapter copies the whole pixel sequence for every frame, does not follow the
        // Photometric Interpretation for colour, and panics on a frame larger than the header
        // says). JPEG 2000 likewise, to check each frame's size before it is copied out.
        let jpeg = JPEG_PROCESSES.contains(&h.transfer_syntax.as_str());
        let j2k = J2K.contains(&h.transfer_syntax.as_str());
        if jpeg || j2k {
            let fragment = self
                .frame_fragment(index)
                .ok_or(PixelError::FrameFragments { frame: index })?;
            let mut out = catch_unwind(AssertUnwindSafe(|| {
                if jpeg {
                    decode_jpeg(&fragment, h, index)
                } else {
                    decode_j2k(&fragment, h, index)
                }
            }))
            .map_err(|_| PixelError::CodecPanicked { frame: index })??;
            mask_all(&mut out, h);
            let pending = if h.samples == 3 {
                Photometric::Rgb
            } else {
                h.photometric
            };
            return Ok((out, pending));
        }
        // RLE: decoded here (dicom-pixeldata's RLE adapter indexes past a short segment).
        if h.transfer_syntax == RLE_LOSSLESS {
            let fragment = self
                .frame_fragment(index)
                .ok_or(PixelError::RleFrame { frame: index })?;
            let mut out = decode_rle(&fragment, h).ok_or(PixelError::RleFrame { frame: index })?;
            mask_all(&mut out, h);
            // RLE keeps the stored colour space: YBR_FULL is converted by the caller.
            let pending = match h.photometric {
                Photometric::YbrFull => Photometric::YbrFull,
                _ if h.samples == 3 => Photometric::Rgb,
                p => p,
            };
            return Ok((out, pending));
        }
        if J2K_OTHER.contains(&h.transfer_syntax.as_str()) {
            let fragment = self
                .frame_fragment(index)
                .ok_or(PixelError::FrameFragments { frame: index })?;
            check_j2k_size(&fragment, h, index)?;
        }
        let decoded = catch_unwind(AssertUnwindSafe(|| {
            obj.decode_pixel_data_frame(index)
                .map(|d| (d.data().to_vec(), d.bits_allocated()))
        }))
        .map_err(|_| PixelError::CodecPanicked { frame: index })?
        .map_err(|source| PixelError::Decode {
            frame: index,
            source,
        })?;
        let (bytes, bits) = decoded;
        let mut out: Vec<i64> = match bits {
            8 => bytes.iter().map(|&b| i64::from(b)).collect(),
            16 => bytes
                .chunks_exact(2)
                .map(|c| i64::from(u16::from_ne_bytes([c[0], c[1]])))
                .collect(),
            other => return Err(PixelError::UnsupportedBitsAllocated { bits: other }),
        };
        mask_all(&mut out, h);
        let pending = match h.photometric {
            Photometric::YbrFull if h.transfer_syntax == RLE_LOSSLESS => Photometric::YbrFull,
            Photometric::Monochrome1 | Photometric::Monochrome2 | Photometric::Palette => {
                h.photometric
            }
            _ => Photometric::Rgb,
        };
        Ok((out, pending))
    }
}

/// The JPEG transfer syntaxes (baseline, extended, lossless, lossless SV1).
const JPEG_PROCESSES: &[&str] = &[
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
];

impl PixelSource {
    /// The compressed bytes of frame `index`: all fragments for one frame, one fragment
    /// per frame, the Basic Offset Table's grouping, or (JPEG) fragments grouped from each
    /// one that starts with an SOI marker. None when none of these fits.
    fn frame_fragment(&self, index: u32) -> Option<Vec<u8>> {
        let element = self.obj.element(tags::PIXEL_DATA).ok()?;
        let Value::PixelSequence(seq) = element.value() else {
            return None;
        };
        let fragments = seq.fragments();
        let frames = self.header.frames as usize;
        let index = index as usize;
        if frames == 1 {
            return Some(fragments.concat());
        }
        if fragments.len() == frames {
            return fragments.get(index).cloned();
        }
        // Start of each frame, as an index into `fragments`.
        let bot = seq.offset_table();
        let starts: Vec<usize> = if bot.len() == frames {
            let mut offset = 0u64;
            let item_offsets: Vec<u64> = fragments
                .iter()
                .map(|f| {
                    let here = offset;
                    offset += 8 + f.len() as u64;
                    here
                })
                .collect();
            bot.iter()
                .map(|&b| item_offsets.iter().position(|&o| o == u64::from(b)))
                .collect::<Option<Vec<usize>>>()?
        } else if JPEG_PROCESSES.contains(&self.header.transfer_syntax.as_str()) {
            fragments
                .iter()
                .enumerate()
                .filter(|(_, f)| f.starts_with(&[0xFF, 0xD8]))
                .map(|(i, _)| i)
                .collect()
        } else {
            return None;
        };
        if starts.len() != frames || starts.windows(2).any(|w| w[0] >= w[1]) {
            return None;
        }
        let end = starts.get(index + 1).copied().unwrap_or(fragments.len());
        Some(fragments[starts[index]..end].concat())
    }
}

/// What a JPEG 2000 codestream's SIZ marker segment says (ITU-T T.800 A.5.1): the image
/// area and each component's size after its subsampling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct J2kSize {
    pub width: u32,
    pub height: u32,
    /// (width, height) of each component.
    pub components: Vec<(u32, u32)>,
}

/// Reads the SIZ of a JPEG 2000 frame without decoding it: a raw codestream (SOC, then SIZ,
/// which T.800 A.4 requires to come right after it) or a JP2 file (T.800 Annex I: the boxes
/// are walked to the contiguous codestream box `jp2c`). None when neither is found whole.
pub fn j2k_size(data: &[u8]) -> Option<J2kSize> {
    const JP2_SIGNATURE: [u8; 12] = [0, 0, 0, 12, b'j', b'P', b' ', b' ', 0x0D, 0x0A, 0x87, 0x0A];
    if data.starts_with(&JP2_SIGNATURE) {
        let mut at = 0usize;
        while at + 8 <= data.len() {
            let length = u32::from_be_bytes(data[at..at + 4].try_into().ok()?) as u64;
            let kind = &data[at + 4..at + 8];
            let (header, length) = match length {
                0 => (8u64, (data.len() - at) as u64),
                1 => {
                    let long = u64::from_be_bytes(data.get(at + 8..at + 16)?.try_into().ok()?);
                    (16, long)
                }
                n => (8, n),
            };
            if length < header {
                return None;
            }
            let end = usize::try_from((at as u64).checked_add(length)?).ok()?;
            let body = data.get(at + header as usize..end.min(data.len()))?;
            if kind == b"jp2c" {
                return siz_of_codestream(body);
            }
            at = end;
        }
        return None;
    }
    siz_of_codestream(data)
}

fn siz_of_codestream(data: &[u8]) -> Option<J2kSize> {
    // SOC (FF4F), SIZ (FF51), Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz,
    // YTOsiz, Csiz, then Ssiz, XRsiz, YRsiz per component.
    if data.get(..4)? != [0xFF, 0x4F, 0xFF, 0x51] {
        return None;
    }
    let u16_at = |i: usize| -> Option<u16> {
        Some(u16::from_be_bytes(data.get(i..i + 2)?.try_into().ok()?))
    };
    let u32_at = |i: usize| -> Option<u32> {
        Some(u32::from_be_bytes(data.get(i..i + 4)?.try_into().ok()?))
    };
    let length = usize::from(u16_at(4)?);
    let (x, y, x0, y0) = (u32_at(8)?, u32_at(12)?, u32_at(16)?, u32_at(20)?);
    let count = usize::from(u16_at(40)?);
    if count == 0 || length != 38 + 3 * count || data.len() < 4 + length || x0 >= x || y0 >= y {
        return None;
    }
    let components = (0..count)
        .map(|c| {
            let (dx, dy) = (
                u32::from(data[42 + 3 * c + 1]),
                u32::from(data[42 + 3 * c + 2]),
            );
            if dx == 0 || dy == 0 {
                return None;
            }
            Some((
                x.div_ceil(dx) - x0.div_ceil(dx),
                y.div_ceil(dy) - y0.div_ceil(dy),
            ))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(J2kSize {
        width: x - x0,
        height: y - y0,
        components,
    })
}

/// JPEG 2000 (lossless only, and lossy).
const J2K: &[&str] = &["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"];

/// The other JPEG 2000 syntaxes (Part 2 multi-component, High-Throughput): decoded, when
/// accepted at all, by `dicom-pixeldata`'s openjp2 adapter, after the same SIZ check.
const J2K_OTHER: &[&str] = &[
    "1.2.840.10008.1.2.4.92",
    "1.2.840.10008.1.2.4.93",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
];

/// The codec decodes what the codestream's SIZ says, whatever the header says: a 64 x 64
/// header over a SIZ of 24000 x 24000 was 2.4 GB and 36 s of decoding before the decoded
/// size was compared. So the SIZ is read first (no decoding) and must say the header's
/// Columns x Rows for every component, with at least SamplesPerPixel and at most 4 of them.
fn check_j2k_size(data: &[u8], h: &ImageHeader, frame: u32) -> Result<(), PixelError> {
    let size = j2k_size(data).ok_or(PixelError::J2kNoSiz { frame })?;
    if size.width != h.cols
        || size.height != h.rows
        || size.components.len() < usize::from(h.samples)
        || size.components.len() > 4
        || size
            .components
            .iter()
            .any(|&(w, h2)| w != h.cols || h2 != h.rows)
    {
        return Err(PixelError::J2kSize {
            frame,
            width: size.width,
            height: size.height,
            components: size.components.len(),
            cols: h.cols,
            rows: h.rows,
            samples: h.samples,
        });
    }
    Ok(())
}

/// Decodes one JPEG 2000 frame: its components (the codec has already undone YBR_RCT /
/// YBR_ICT) interleaved, checked against the header's size and samples.
fn decode_j2k(data: &[u8], h: &ImageHeader, frame: u32) -> Result<Vec<i64>, PixelError> {
    check_j2k_size(data, h, frame)?;
    let image = jpeg2k::Image::from_bytes(data)
        .map_err(|source| PixelError::DecodeJ2k { frame, source })?;
    let samples = usize::from(h.samples);
    let pixels = h.frame_pixels() as usize;
    let components = image.components();
    let size_error = |got| PixelError::DecodedSize {
        frame,
        expected: pixels * samples,
        got,
    };
    if components.len() < samples {
        return Err(size_error(components.len() * pixels));
    }
    let mut out = vec![0i64; pixels * samples];
    for (s, c) in components.iter().take(samples).enumerate() {
        if c.width() != h.cols || c.height() != h.rows || c.data().len() != pixels {
            return Err(size_error(c.data().len() * samples));
        }
        for (p, &v) in c.data().iter().enumerate() {
            out[p * samples + s] = i64::from(v);
        }
    }
    Ok(out)
}

/// What a JPEG codestream says about its colour (pydicom's `_get_jpg_parameters`): the
/// component identifiers of its frame header and whether it has a JFIF APP0 marker.
fn jpeg_colour_markers(data: &[u8]) -> (Option<[u8; 3]>, bool) {
    let mut jfif = false;
    let mut offset = 2;
    if data.get(0..2) != Some(&[0xFF, 0xD8]) {
        return (None, false);
    }
    while offset + 4 <= data.len() {
        if data[offset] != 0xFF {
            break;
        }
        let code = data[offset + 1];
        let length = usize::from(u16::from_be_bytes([data[offset + 2], data[offset + 3]]));
        let body = data.get(offset + 4..offset + 2 + length.max(2));
        match code {
            0xC0..=0xCF if !matches!(code, 0xC4 | 0xC8 | 0xCC) => {
                let ids = body
                    .filter(|b| b.len() >= 6 + 3 * 3 && b[5] == 3)
                    .map(|b| [b[6], b[9], b[12]]);
                return (ids, jfif);
            }
            0xE0 if body.is_some_and(|b| b.starts_with(b"JFIF")) => jfif = true,
            _ => {}
        }
        offset += 2 + length;
    }
    (None, jfif)
}

/// Whether the modality rescale keeps the stored range an image: its ends finite in `f32`
/// with a finite span between them (what the windows and the preprocessing compute), and
/// still distinct. A slope of 1e308 made every pixel infinite, and an intercept of 1e39 or
/// 1e30 made them all one value: each was processed as a blank image and reported with a
/// finding.
fn rescale_keeps_the_range(bits_stored: u16, signed: bool, slope: f64, intercept: f64) -> bool {
    let bits = i32::from(bits_stored.clamp(1, 32));
    let (min, max) = if signed {
        (-(2f64.powi(bits - 1)), 2f64.powi(bits - 1) - 1.0)
    } else {
        (0.0, 2f64.powi(bits) - 1.0)
    };
    let (a, b) = (min * slope + intercept, max * slope + intercept);
    let limit = f64::from(f32::MAX) / 2.0;
    a.abs() <= limit && b.abs() <= limit && (a as f32) != (b as f32)
}

/// Decodes one JPEG frame to its samples: grey as stored (8 or 16 bits); colour (8 bits) to
/// interleaved RGB with the colour transform the Photometric Interpretation implies (RGB:
/// none; YBR: YCbCr → RGB), conformed to the codestream as pydicom does (component ids "RGB"
/// mean RGB; a JFIF marker means YBR). jpeg-decoder's `ColorTransform::RGB` is its
/// no-conversion path for RGB that interleaves the samples; its `None` writes each row as
/// all its R, then all its G, then all its B (every RGB JPEG was decoded so, its rows
/// scrambled: a red-team finding against pydicom and dcmtk).
fn decode_jpeg(data: &[u8], h: &ImageHeader, frame: u32) -> Result<Vec<i64>, PixelError> {
    let expected = h.frame_pixels() as usize * usize::from(h.samples);
    let mut decoder = jpeg_decoder::Decoder::new(data);
    decoder.set_max_decoding_buffer_size(expected * 2 + 1024);
    if h.samples == 3 {
        let (ids, jfif) = jpeg_colour_markers(data);
        let rgb_ids = matches!(ids, Some([82, 71, 66]) | Some([114, 103, 98]));
        let is_rgb = rgb_ids || (h.photometric == Photometric::Rgb && !jfif);
        decoder.set_color_transform(if is_rgb {
            jpeg_decoder::ColorTransform::RGB
        } else {
            jpeg_decoder::ColorTransform::YCbCr
        });
    }
    // The frame header first: a frame whose declared size is not the header's is refused
    // before jpeg-decoder allocates (and fills) what it declares.
    decoder
        .read_info()
        .map_err(|source| PixelError::DecodeJpeg { frame, source })?;
    if let Some(info) = decoder.info() {
        let components = match info.pixel_format {
            jpeg_decoder::PixelFormat::L8 | jpeg_decoder::PixelFormat::L16 => 1,
            jpeg_decoder::PixelFormat::RGB24 => 3,
            jpeg_decoder::PixelFormat::CMYK32 => 4,
        };
        if u32::from(info.width) != h.cols
            || u32::from(info.height) != h.rows
            || components != usize::from(h.samples)
        {
            return Err(PixelError::JpegSize {
                frame,
                width: info.width,
                height: info.height,
                components,
                cols: h.cols,
                rows: h.rows,
                samples: h.samples,
            });
        }
    }
    let bytes = decoder
        .decode()
        .map_err(|source| PixelError::DecodeJpeg { frame, source })?;
    let size_error = |got| PixelError::DecodedSize {
        frame,
        expected,
        got,
    };
    let info = decoder.info().ok_or(size_error(0))?;
    if u32::from(info.width) != h.cols || u32::from(info.height) != h.rows {
        return Err(size_error(bytes.len()));
    }
    let values: Vec<i64> = match (info.pixel_format, h.samples) {
        (jpeg_decoder::PixelFormat::L8, 1) | (jpeg_decoder::PixelFormat::RGB24, 3) => {
            bytes.iter().map(|&b| i64::from(b)).collect()
        }
        (jpeg_decoder::PixelFormat::L16, 1) => bytes
            .chunks_exact(2)
            .map(|c| i64::from(u16::from_ne_bytes([c[0], c[1]])))
            .collect(),
        _ => return Err(size_error(bytes.len())),
    };
    if values.len() != expected {
        return Err(size_error(values.len()));
    }
    Ok(values)
}

/// Decodes one RLE Lossless frame (PS3.5 Annex G): a 64-byte header of segment offsets, then
/// one PackBits segment per byte of each sample, most significant first. Returns the samples
/// interleaved, or None when the frame does not hold what the header says.
fn decode_rle(fragment: &[u8], h: &ImageHeader) -> Option<Vec<i64>> {
    let pixels = h.frame_pixels() as usize;
    let samples = usize::from(h.samples);
    let bytes = usize::from(h.bits_allocated / 8);
    let segments = samples * bytes;
    let header = fragment.get(..64)?;
    let word = |i: usize| u32::from_le_bytes(header[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    if word(0) as usize != segments || segments == 0 || segments > 15 {
        return None;
    }
    let mut offsets: Vec<usize> = (1..=segments).map(|i| word(i) as usize).collect();
    offsets.push(fragment.len());
    if offsets.windows(2).any(|w| w[0] > w[1]) || offsets[0] < 64 {
        return None;
    }
    let mut out = vec![0i64; pixels * samples];
    let mut segment = Vec::with_capacity(pixels);
    for s in 0..samples {
        for b in 0..bytes {
            let k = s * bytes + b;
            packbits(&fragment[offsets[k]..offsets[k + 1]], pixels, &mut segment)?;
            let shift = 8 * (bytes - 1 - b);
            for (p, &v) in segment.iter().enumerate() {
                out[p * samples + s] |= i64::from(v) << shift;
            }
        }
    }
    Some(out)
}

/// PackBits into exactly `n` bytes (a trailing pad byte is ignored; fewer bytes is None).
fn packbits(src: &[u8], n: usize, out: &mut Vec<u8>) -> Option<()> {
    out.clear();
    let mut i = 0;
    while out.len() < n && i < src.len() {
        let header = src[i] as i8;
        i += 1;
        match header {
            0..=127 => {
                let len = header as usize + 1;
                out.extend_from_slice(src.get(i..i + len)?);
                i += len;
            }
            -127..=-1 => {
                let value = *src.get(i)?;
                i += 1;
                out.extend(std::iter::repeat_n(value, (1 - i16::from(header)) as usize));
            }
            -128 => {}
        }
    }
    if out.len() < n {
        return None;
    }
    out.truncate(n);
    Some(())
}

/// Checks that the instances of a series are one patient's one kind of object
/// ([`crate::series::IDENTITY_ATTRIBUTES`]: [`PixelError::MixedIdentity`], naming the attribute
/// but no value) and can be stacked: same rows, columns, samples per pixel and photometric
/// interpretation as the first.
pub fn check_series(headers: &[ImageHeader]) -> Result<(), PixelError> {
    let Some(first) = headers.first() else {
        return Ok(());
    };
    for (index, h) in headers.iter().enumerate().skip(1) {
        if let Some(attribute) = first.identity.differs(&h.identity) {
            return Err(PixelError::MixedIdentity { index, attribute });
        }
        let differ = |attribute, a: String, b: String| PixelError::MixedSeries {
            index,
            attribute,
            first: a,
            other: b,
        };
        if h.rows != first.rows {
            return Err(differ("Rows", first.rows.to_string(), h.rows.to_string()));
        }
        if h.cols != first.cols {
            return Err(differ(
                "Columns",
                first.cols.to_string(),
                h.cols.to_string(),
            ));
        }
        if h.samples != first.samples {
            return Err(differ(
                "SamplesPerPixel",
                first.samples.to_string(),
                h.samples.to_string(),
            ));
        }
        if h.photometric != first.photometric {
            return Err(differ(
                "PhotometricInterpretation",
                first.photometric.as_str().to_owned(),
                h.photometric.as_str().to_owned(),
            ));
        }
        if h.displays_inverted() != first.displays_inverted() {
            let shape = |h: &ImageHeader| {
                if h.presentation_inverse {
                    "INVERSE"
                } else {
                    "IDENTITY"
                }
            };
            return Err(differ(
                "PresentationLUTShape",
                shape(first).to_owned(),
                shape(h).to_owned(),
            ));
        }
    }
    Ok(())
}

// --- 8-bit rendering (Secondary Capture) ------------------------------------------------

/// How to window a grey frame for display.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum RenderWindow {
    /// The header's window if the frame has one, else the 0.5th–99.5th percentiles.
    #[default]
    Auto,
    /// The `low`th–`high`th percentiles of the frame's modality values (numpy's linear method).
    Percentiles { low: f64, high: f64 },
    /// A fixed window in modality units (LINEAR).
    Fixed { center: f64, width: f64 },
}

/// An 8-bit frame for display: MONOCHROME2 (1 sample) or RGB (3 interleaved).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub rows: usize,
    pub cols: usize,
    pub samples: usize,
    pub data: Vec<u8>,
}

/// Renders a frame (as [`PixelSource::frame`] returns it with any options) to 8 bits:
/// grey frames windowed and MONOCHROME1 inverted, RGB scaled from its bit depth.
pub fn render8(frame: &Frame, window: RenderWindow) -> Result<Rendered, PixelError> {
    let n = frame.rows * frame.cols * frame.samples;
    if frame.data.len() != n || !(frame.samples == 1 || frame.samples == 3) {
        return Err(PixelError::DecodedSize {
            frame: frame.index,
            expected: n,
            got: frame.data.len(),
        });
    }
    let data = if frame.samples == 3 {
        let max = match frame.values {
            Values::Voi => 1.0,
            _ => 2f64.powi(i32::from(frame.bits_stored.clamp(1, 16))) - 1.0,
        };
        frame
            .data
            .iter()
            .map(|&v| (f64::from(v) / max * 255.0 + 0.5).floor().clamp(0.0, 255.0) as u8)
            .collect()
    } else {
        let modality: Vec<f32> = frame
            .data
            .iter()
            .map(|&v| (f64::from(v) * frame.slope + frame.intercept) as f32)
            .collect();
        let (lo, hi) = if frame.values == Values::Voi {
            (0.0, 1.0)
        } else {
            let w = match window {
                RenderWindow::Auto => match frame.window {
                    Some(w) if w.width > 0.0 => Some((w.center, w.width)),
                    _ => None,
                },
                RenderWindow::Fixed { center, width } => Some((center, width)),
                RenderWindow::Percentiles { .. } => None,
            };
            match (w, window) {
                (Some((c, w)), _) => (c - w / 2.0, c + w / 2.0),
                (None, RenderWindow::Percentiles { low, high }) => {
                    percentiles_f32(&modality, low, high)
                }
                (None, _) => percentiles_f32(&modality, 0.5, 99.5),
            }
        };
        let span = hi - lo;
        modality
            .iter()
            .map(|&v| {
                let mut y = if span > 0.0 {
                    ((f64::from(v) - lo) / span).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                if frame.monochrome1 {
                    y = 1.0 - y;
                }
                (y * 255.0 + 0.5).floor() as u8
            })
            .collect()
    };
    Ok(Rendered {
        rows: frame.rows,
        cols: frame.cols,
        samples: frame.samples,
        data,
    })
}

/// The `low`th and `high`th percentiles (numpy's linear method) of `v`, by selection on a copy.
fn percentiles_f32(v: &[f32], low: f64, high: f64) -> (f64, f64) {
    let mut scratch: Vec<f32> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if scratch.is_empty() {
        return (0.0, 0.0);
    }
    let n = scratch.len();
    let mut at = |q: f64| {
        let idx = q.clamp(0.0, 100.0) / 100.0 * (n - 1) as f64;
        let i = (idx.floor() as usize).min(n - 1);
        let t = idx - i as f64;
        let (_, a, right) = scratch.select_nth_unstable_by(i, f32::total_cmp);
        let a = f64::from(*a);
        if t == 0.0 || right.is_empty() {
            return a;
        }
        let b = f64::from(right.iter().copied().fold(f32::INFINITY, f32::min));
        a + (b - a) * t
    };
    (at(low), at(high))
}

// --- decode budget ------------------------------------------------------------------------

/// A budget of pixels being decoded at once, shared by the pipeline's decode tasks: hold a
/// [`DecodePermit`] (for the instance's `rows × cols × frames`, or one frame when decoding
/// frame by frame) while decoding. A request larger than the whole budget takes all of it,
/// so one large image still decodes, alone.
#[derive(Clone, Debug)]
pub struct DecodeBudget {
    semaphore: Arc<tokio::sync::Semaphore>,
    units: u32,
}

/// Pixels per semaphore unit (so a budget of gigapixels fits the semaphore's `u32`).
const PIXELS_PER_UNIT: u64 = 4096;

/// Held while decoding; the budget is returned on drop.
#[derive(Debug)]
pub struct DecodePermit {
    _permit: tokio::sync::OwnedSemaphorePermit,
    pixels: u64,
}

impl DecodePermit {
    pub fn pixels(&self) -> u64 {
        self.pixels
    }
}

impl DecodeBudget {
    /// A budget of `pixels` in flight (at least one unit).
    pub fn new(pixels: u64) -> Self {
        let units = pixels
            .div_ceil(PIXELS_PER_UNIT)
            .clamp(1, u64::from(u32::MAX >> 3)) as u32;
        DecodeBudget {
            semaphore: Arc::new(tokio::sync::Semaphore::new(units as usize)),
            units,
        }
    }

    /// The budget's size in pixels.
    pub fn capacity(&self) -> u64 {
        u64::from(self.units) * PIXELS_PER_UNIT
    }

    /// Pixels free now.
    pub fn available(&self) -> u64 {
        self.semaphore.available_permits() as u64 * PIXELS_PER_UNIT
    }

    fn units_for(&self, pixels: u64) -> u32 {
        pixels
            .div_ceil(PIXELS_PER_UNIT)
            .clamp(1, u64::from(self.units)) as u32
    }

    /// Waits at most `wait` for `pixels` of budget.
    pub async fn acquire(&self, pixels: u64, wait: Duration) -> Result<DecodePermit, PixelError> {
        let units = self.units_for(pixels);
        match tokio::time::timeout(wait, self.semaphore.clone().acquire_many_owned(units)).await {
            Ok(Ok(permit)) => Ok(DecodePermit {
                _permit: permit,
                pixels,
            }),
            // The semaphore is never closed; a timeout is the only way to get here.
            _ => Err(PixelError::BudgetTimeout { waited: wait }),
        }
    }

    /// `pixels` of budget if free now.
    pub fn try_acquire(&self, pixels: u64) -> Option<DecodePermit> {
        let units = self.units_for(pixels);
        self.semaphore
            .clone()
            .try_acquire_many_owned(units)
            .ok()
            .map(|permit| DecodePermit {
                _permit: permit,
                pixels,
            })
    }
}

// --- helpers ------------------------------------------------------------------------------

fn printable(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(64)
        .collect()
}

fn has(obj: &InMemDicomObject, tag: Tag) -> bool {
    matches!(obj.element_opt(tag), Ok(Some(_)))
}

fn optional_str(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(['\0', ' ']).to_owned())
        .filter(|s| !s.is_empty())
}

fn optional_int<T>(
    obj: &InMemDicomObject,
    tag: Tag,
    name: &'static str,
) -> Result<Option<T>, PixelError>
where
    T: Clone + num_like::FromI64,
{
    let Some(e) = obj.element_opt(tag).ok().flatten() else {
        return Ok(None);
    };
    if e.value().primitive().is_some_and(|p| p.is_empty()) {
        return Ok(None);
    }
    one_value(e.value(), name)?;
    let v: i64 = e
        .to_int::<i64>()
        .map_err(|_| PixelError::InvalidAttribute { name })?;
    T::from_i64(v)
        .map(Some)
        .ok_or(PixelError::InvalidAttribute { name })
}

/// The attributes read here hold one value (VM 1): `1\-1` is not a slope of 1, nor `0\1`
/// an unsigned Pixel Representation (each read as its first value, red-team findings: the
/// second gave a confident result from misread pixels; pydicom refuses them too).
fn one_value(
    value: &dicom_core::value::Value<InMemDicomObject, dicom_core::value::InMemFragment>,
    name: &'static str,
) -> Result<(), PixelError> {
    if value.multiplicity() == 1 {
        Ok(())
    } else {
        Err(PixelError::InvalidAttribute { name })
    }
}

fn required_int<T>(obj: &InMemDicomObject, tag: Tag, name: &'static str) -> Result<T, PixelError>
where
    T: Clone + num_like::FromI64,
{
    optional_int(obj, tag, name)?.ok_or(PixelError::MissingAttribute { name })
}

fn optional_float(
    obj: &InMemDicomObject,
    tag: Tag,
    name: &'static str,
) -> Result<Option<f64>, PixelError> {
    let Some(e) = obj.element_opt(tag).ok().flatten() else {
        return Ok(None);
    };
    if e.value().primitive().is_some_and(|p| p.is_empty()) {
        return Ok(None);
    }
    one_value(e.value(), name)?;
    e.to_float64()
        .map(Some)
        .map_err(|_| PixelError::InvalidAttribute { name })
}

/// The first Window Center/Width pair of `obj` (a data set, or a Frame VOI LUT functional
/// group item) with its VOI LUT Function, if both are there and finite.
pub(crate) fn window_of(obj: &InMemDicomObject) -> Option<WindowLevel> {
    let center = first_float(obj, tags::WINDOW_CENTER)?;
    let width = first_float(obj, tags::WINDOW_WIDTH)?;
    if !(center.is_finite() && width.is_finite()) {
        return None;
    }
    let function = match optional_str(obj, tags::VOILUT_FUNCTION).as_deref() {
        Some("LINEAR_EXACT") => VoiFunction::LinearExact,
        Some("SIGMOID") => VoiFunction::Sigmoid,
        _ => VoiFunction::Linear,
    };
    Some(WindowLevel {
        center,
        width,
        function,
    })
}

fn first_float(obj: &InMemDicomObject, tag: Tag) -> Option<f64> {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_multi_float64().ok())
        .and_then(|v| v.first().copied())
}

mod num_like {
    pub trait FromI64: Sized {
        fn from_i64(v: i64) -> Option<Self>;
    }
    macro_rules! impl_from_i64 {
        ($($t:ty),*) => {$(
            impl FromI64 for $t {
                fn from_i64(v: i64) -> Option<Self> {
                    <$t>::try_from(v).ok()
                }
            }
        )*};
    }
    impl_from_i64!(u16, u32, i64);
}

fn primitive_len(p: &PrimitiveValue) -> u64 {
    match p {
        PrimitiveValue::U8(b) => b.len() as u64,
        PrimitiveValue::U16(w) => 2 * w.len() as u64,
        PrimitiveValue::I16(w) => 2 * w.len() as u64,
        // Other value types are not pixel data this module reads: as if empty.
        _ => 0,
    }
}

/// Byte `k` of a native pixel data value (16-bit words little-endian, as they are after
/// the parser has read them in the file's byte order).
fn primitive_byte(p: &PrimitiveValue, k: usize) -> u8 {
    match p {
        PrimitiveValue::U8(b) => b[k],
        PrimitiveValue::U16(w) => w[k / 2].to_le_bytes()[k % 2],
        PrimitiveValue::I16(w) => w[k / 2].to_le_bytes()[k % 2],
        _ => 0,
    }
}

/// Samples one native frame holds (YBR_FULL_422: two per pixel, Y1 Y2 Cb Cr per pair).
fn native_frame_samples(h: &ImageHeader) -> u64 {
    let per_pixel = if h.photometric == Photometric::YbrFull422 {
        2
    } else {
        u64::from(h.samples)
    };
    h.frame_pixels() * per_pixel
}

/// Bytes of native pixel data `frames` frames need.
fn native_bytes(h: &ImageHeader, frames: u32) -> u64 {
    let samples = native_frame_samples(h) * u64::from(frames);
    if h.bits_allocated == 1 {
        samples.div_ceil(8)
    } else {
        samples * u64::from(h.bits_allocated / 8)
    }
}

/// Masks each value to BitsStored and sign-extends it when PixelRepresentation is signed.
fn mask_all(values: &mut [i64], h: &ImageHeader) {
    let bits = u32::from(h.bits_stored);
    let mask = (1i64 << bits) - 1;
    let sign = 1i64 << (bits - 1);
    for v in values {
        let mut x = *v & mask;
        if h.signed && x & sign != 0 {
            x -= 1 << bits;
        }
        *v = x;
    }
}

/// Planar (RRR…GGG…BBB…) to interleaved (RGBRGB…).
fn interleave(planes: &[i64]) -> Vec<i64> {
    let n = planes.len() / 3;
    (0..n)
        .flat_map(|i| [planes[i], planes[n + i], planes[2 * n + i]])
        .collect()
}

/// Native YBR_FULL_422 (Y1 Y2 Cb Cr per pair of pixels) to YBR_FULL.
fn expand_422(raw: &[i64]) -> Vec<i64> {
    let mut out = Vec::with_capacity(raw.len() / 2 * 3);
    for q in raw.chunks_exact(4) {
        out.extend_from_slice(&[q[0], q[2], q[3], q[1], q[2], q[3]]);
    }
    out
}

/// YBR_FULL to RGB as pydicom does it (PS3.3 C.7.6.3.1.2, float32, round half up, clipped).
fn ybr_full_to_rgb(ybr: &[i64]) -> Vec<f32> {
    let k1 = (-0.114f64 * 1.772 / 0.587) as f32;
    let k2 = (-0.299f64 * 1.402 / 0.587) as f32;
    let mut out = Vec::with_capacity(ybr.len());
    for p in ybr.chunks_exact(3) {
        let y = p[0] as f32;
        let cb = p[1] as f32 - 128.0;
        let cr = p[2] as f32 - 128.0;
        let r = y + 1.402f32 * cr;
        let g = y + k1 * cb + k2 * cr;
        let b = y + 1.772f32 * cb;
        for c in [r, g, b] {
            out.push((c + 0.5).floor().clamp(0.0, 255.0));
        }
    }
    out
}

/// The number of entries a LUT descriptor's first value gives (0 means 65536; the value is
/// 16 bits, whatever VR it was read with).
fn lut_entries(first: i64) -> usize {
    match (first & 0xFFFF) as usize {
        0 => 65536,
        n => n,
    }
}

/// A palette colour lookup table (PS3.3 C.7.6.3.1.5), non-segmented.
struct Palette {
    entries: usize,
    first: i64,
    bits: u16,
    rgb: [Vec<u16>; 3],
}

impl Palette {
    fn read(obj: &InMemDicomObject) -> Result<Self, PixelError> {
        let unsupported = PixelError::UnsupportedLut {
            what: "this Palette Color Lookup Table (segmented or malformed)",
        };
        let desc = obj
            .element_opt(tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR)
            .ok()
            .flatten()
            .and_then(|e| e.to_multi_int::<i64>().ok())
            .filter(|d| d.len() == 3)
            .ok_or(PixelError::MissingAttribute {
                name: "RedPaletteColorLookupTableDescriptor",
            })?;
        let entries = lut_entries(desc[0]);
        let first = desc[1];
        let mut rgb: [Vec<u16>; 3] = Default::default();
        let mut depth = 0;
        for (i, tag) in [
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ]
        .into_iter()
        .enumerate()
        {
            let e = obj
                .element_opt(tag)
                .ok()
                .flatten()
                .ok_or(PixelError::UnsupportedLut {
                    what: "Palette Color Lookup Table without data (segmented)",
                })?;
            let Value::Primitive(p) = e.value() else {
                return Err(unsupported);
            };
            let bytes = primitive_len(p) as usize;
            // pydicom: the depth is the data's length over the entries (8 or 16 bits).
            depth = bytes * 8 / entries;
            rgb[i] = match depth {
                8 => (0..bytes)
                    .map(|k| u16::from(primitive_byte(p, k)))
                    .collect(),
                16 => (0..bytes / 2)
                    .map(|k| {
                        u16::from_le_bytes([primitive_byte(p, 2 * k), primitive_byte(p, 2 * k + 1)])
                    })
                    .collect(),
                _ => return Err(unsupported),
            };
            if rgb[i].len() != entries {
                return Err(unsupported);
            }
        }
        Ok(Palette {
            entries,
            first,
            bits: depth as u16,
            rgb,
        })
    }

    fn apply(&self, indices: &[i64]) -> Vec<f32> {
        let mut out = Vec::with_capacity(indices.len() * 3);
        for &v in indices {
            let i = (v - self.first).clamp(0, self.entries as i64 - 1) as usize;
            out.extend(self.rgb.iter().map(|t| f32::from(t[i])));
        }
        out
    }
}

/// The first item of the VOI LUT Sequence.
struct VoiLut {
    first: i64,
    bits: u16,
    data: Vec<u32>,
}

impl VoiLut {
    fn read(obj: &InMemDicomObject) -> Result<Self, PixelError> {
        let bad = PixelError::UnsupportedLut {
            what: "this VOI LUT Sequence",
        };
        let item = obj
            .element_opt(tags::VOILUT_SEQUENCE)
            .ok()
            .flatten()
            .and_then(|e| e.items().and_then(|items| items.first()))
            .ok_or(PixelError::UnsupportedLut {
                what: "an empty VOI LUT Sequence",
            })?;
        let desc = item
            .element_opt(tags::LUT_DESCRIPTOR)
            .ok()
            .flatten()
            .and_then(|e| e.to_multi_int::<i64>().ok())
            .filter(|d| d.len() == 3)
            .ok_or(PixelError::UnsupportedLut {
                what: "a VOI LUT without a descriptor",
            })?;
        let entries = lut_entries(desc[0]);
        let bits = u16::try_from(desc[2]).ok().filter(|b| (1..=16).contains(b));
        let data: Vec<u32> = item
            .element_opt(tags::LUT_DATA)
            .ok()
            .flatten()
            .and_then(|e| e.to_multi_int::<u32>().ok())
            .unwrap_or_default();
        match bits {
            Some(bits) if data.len() == entries => Ok(VoiLut {
                first: desc[1],
                bits,
                data,
            }),
            _ => Err(bad),
        }
    }

    fn apply(&self, values: &mut [f32]) {
        let max = (2f64.powi(i32::from(self.bits)) - 1.0) as f32;
        let last = self.data.len() as i64 - 1;
        for x in values {
            let i = (*x as i64 - self.first).clamp(0, last) as usize;
            *x = self.data[i] as f32 / max;
        }
    }
}

/// A window (PS3.3 C.11.2.1.2) to 0–1.
fn window01(values: &mut [f32], w: WindowLevel) -> Result<(), PixelError> {
    let (c, width) = (w.center, w.width);
    match w.function {
        VoiFunction::Linear => {
            if width < 1.0 {
                return Err(PixelError::InvalidAttribute {
                    name: "WindowWidth",
                });
            }
            let low = c - 0.5 - (width - 1.0) / 2.0;
            let high = c - 0.5 + (width - 1.0) / 2.0;
            for x in values {
                let v = f64::from(*x);
                *x = if v <= low {
                    0.0
                } else if v > high {
                    1.0
                } else {
                    ((v - (c - 0.5)) / (width - 1.0) + 0.5) as f32
                };
            }
        }
        VoiFunction::LinearExact => {
            if width <= 0.0 {
                return Err(PixelError::InvalidAttribute {
                    name: "WindowWidth",
                });
            }
            for x in values {
                let v = f64::from(*x);
                *x = if v <= c - width / 2.0 {
                    0.0
                } else if v > c + width / 2.0 {
                    1.0
                } else {
                    ((v - c) / width + 0.5) as f32
                };
            }
        }
        VoiFunction::Sigmoid => {
            if width <= 0.0 {
                return Err(PixelError::InvalidAttribute {
                    name: "WindowWidth",
                });
            }
            for x in values {
                let v = f64::from(*x);
                *x = (1.0 / (1.0 + (-4.0 * (v - c) / width).exp())) as f32;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_and_sign_extension() {
        let mut h = ImageHeader {
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            rows: 1,
            cols: 3,
            samples: 1,
            bits_allocated: 16,
            bits_stored: 12,
            signed: true,
            planar: false,
            photometric: Photometric::Monochrome2,
            frames: 1,
            slope: 1.0,
            intercept: 0.0,
            window: None,
            modality_lut_sequence: false,
            voi_lut_sequence: false,
            presentation_inverse: false,
            identity: Default::default(),
        };
        let mut v = vec![0x0FFF, 0xF800, 0x07FF];
        mask_all(&mut v, &h);
        assert_eq!(v, vec![-1, -2048, 2047]);
        h.signed = false;
        let mut v = vec![0xFFFF, 0x1234];
        mask_all(&mut v, &h);
        assert_eq!(v, vec![0x0FFF, 0x0234]);
    }

    #[test]
    fn errors_travel_between_threads() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<PixelError>();
        send_sync::<PixelSource>();
    }

    #[test]
    fn rgb_renders_by_bit_depth_and_grey_by_window() {
        let frame = Frame {
            index: 0,
            rows: 1,
            cols: 2,
            samples: 3,
            data: vec![0.0, 65535.0, 32768.0, 255.0, 1.0, 0.0],
            slope: 1.0,
            intercept: 0.0,
            monochrome1: false,
            values: Values::Stored,
            window: None,
            bits_stored: 16,
        };
        let r = render8(&frame, RenderWindow::Auto).unwrap();
        // v / 65535 * 255, rounded half up.
        assert_eq!(r.data, vec![0, 255, 128, 1, 0, 0]);
        let grey = Frame {
            samples: 1,
            cols: 4,
            data: vec![-100.0, 0.0, 50.0, 200.0],
            monochrome1: true,
            bits_stored: 12,
            ..frame
        };
        let r = render8(
            &grey,
            RenderWindow::Fixed {
                center: 50.0,
                width: 100.0,
            },
        )
        .unwrap();
        // [0, 100] → 0..255, then inverted for MONOCHROME1.
        assert_eq!(r.data, vec![255, 255, 128, 0]);
    }

    #[test]
    fn percentiles_follow_numpy_linear() {
        // numpy.percentile([1, 2, 3, 4, 10], [25, 90]) = [2, 7.6]
        let (a, b) = percentiles_f32(&[10.0, 3.0, 1.0, 4.0, 2.0], 25.0, 90.0);
        assert_eq!(a, 2.0);
        assert!((b - 7.6).abs() < 1e-9);
    }

    #[test]
    fn the_budget_lends_at_most_its_capacity() {
        let budget = DecodeBudget::new(10 * PIXELS_PER_UNIT);
        let a = budget.try_acquire(6 * PIXELS_PER_UNIT).expect("free");
        assert!(budget.try_acquire(6 * PIXELS_PER_UNIT).is_none());
        let big = budget.try_acquire(u64::MAX);
        assert!(big.is_none(), "a huge request waits for the whole budget");
        drop(a);
        let all = budget.try_acquire(u64::MAX).expect("the whole budget");
        assert_eq!(budget.available(), 0);
        drop(all);
        assert_eq!(budget.available(), budget.capacity());
    }
}
