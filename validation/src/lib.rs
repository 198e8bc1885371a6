//! Nightingale's validation harness: how a model performs on a labelled dataset, with
//! uncertainty, calibration and subgroups, and whether it clears the floors its bundle
//! declares.
//!
//! The crate computes; the root package runs the model (the same repository, workers and
//! engine as serving) and hands this crate the scores. Every metric states the reference
//! definition it follows (scikit-learn, statsmodels, DeLong 1988, Vickers 2006), and the
//! peer tests hold it to that reference.
//!
//! ```
//! use nightingale_validation::metrics;
//!
//! let y = [true, false, true, false];
//! let p = [0.9, 0.3, 0.6, 0.7];
//! assert_eq!(metrics::auroc(&y, &p), Some(0.75));
//! let c = metrics::confusion(&y, &p, 0.5);
//! assert_eq!((c.tp, c.fp, c.tn, c.fn_), (2, 1, 1, 0));
//! ```

pub mod bootstrap;
pub mod dataset;
pub mod gate;
pub mod html;
pub mod metrics;
pub mod multiclass;
pub mod report;

pub use dataset::{
    Columns, CsvDataset, DatasetError, DatasetSummary, LabelSpec, NpyDataset, Row, Unusable,
};
pub use gate::{GateResult, check as check_gate, check_multiclass as check_gate_multiclass};
pub use report::{NamedThreshold, Report, Settings};
