//! Percentile bootstrap intervals, seeded and parallel, by row or by cluster (patient).
//!
//! A replicate is a vector of weights (how many times each row was drawn), so each metric is
//! one pass over the rows in an order sorted once: O(n) per replicate instead of a sort. The
//! weighted metrics equal the metric of the resampled rows exactly (ties included).
//! Replicate `b` draws from its own generator, seeded from (`seed`, `b`), so the result does
//! not depend on the number of threads.

use rand::Rng;
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use rayon::prelude::*;
use serde::Serialize;

use crate::metrics::{self, quantile_sorted};

/// How to resample.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BootstrapSpec {
    pub replicates: usize,
    pub seed: u64,
    pub confidence: f64,
    /// Set, the replicates not yet drawn are not drawn and the intervals are not computed:
    /// a run stopped (cancelled, or at the server's time limit) kept every thread of the
    /// shared pool busy for minutes, and the runs after it, on other models, were stopped
    /// at the limit waiting for it (a red-team finding).
    #[serde(skip)]
    pub stop: Option<Stop>,
}

/// A flag a bootstrap checks before each replicate ([`BootstrapSpec::stop`]).
#[derive(Clone, Debug, Default)]
pub struct Stop(pub std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Stop {
    pub fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl PartialEq for Stop {
    fn eq(&self, other: &Stop) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}

impl BootstrapSpec {
    fn stopped(&self) -> bool {
        self.stop.as_ref().is_some_and(Stop::is_set)
    }
}

/// A percentile interval from the replicates where the metric was defined.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct BootstrapCi {
    pub ci_lower: f64,
    pub ci_upper: f64,
    /// Replicates that had both classes (the others cannot have an AUROC).
    pub replicates: usize,
    pub replicates_skipped: usize,
}

/// The bootstrap intervals of the threshold-free metrics.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BootstrapResult {
    pub auroc: Option<BootstrapCi>,
    pub auprc: Option<BootstrapCi>,
    pub brier: Option<BootstrapCi>,
    /// A pointwise band around the ROC curve: at each false-positive rate of
    /// [`ROC_BAND_GRID`], the percentile interval of the replicates' true-positive rate
    /// (vertical averaging, Fawcett 2006).
    pub roc_band: Vec<RocBandPoint>,
}

/// Points of the ROC band: false-positive rates 0, 0.02, …, 1.
pub const ROC_BAND_GRID: usize = 51;

/// One point of the ROC band.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RocBandPoint {
    pub fpr: f64,
    pub tpr_lower: f64,
    pub tpr_upper: f64,
}

type Replicate = (
    Option<f64>,
    Option<f64>,
    Option<f64>,
    Option<[f64; ROC_BAND_GRID]>,
);

/// Rows sorted by score (descending) with their tie groups, shared by every replicate.
struct Sorted {
    order: Vec<usize>,
    groups: Vec<(usize, usize)>,
}

impl Sorted {
    fn new(p: &[f64]) -> Sorted {
        let (order, groups) = metrics::groups_descending(p);
        Sorted { order, groups }
    }
}

/// Each cluster's positive–negative pairs among its own rows: how many rank the positive
/// above the negative (ties half: its AUROC times its pairs), and how many there are.
fn within_pairs(y: &[bool], p: &[f64], members: &[Vec<usize>]) -> Vec<(f64, u64)> {
    members
        .iter()
        .map(|rows| {
            let ys: Vec<bool> = rows.iter().map(|&r| y[r]).collect();
            let ps: Vec<f64> = rows.iter().map(|&r| p[r]).collect();
            let (pos, neg) = metrics::class_counts(&ys);
            let pairs = (pos * neg) as u64;
            let concordant = metrics::auroc(&ys, &ps).map_or(0.0, |a| a * pairs as f64);
            (concordant, pairs)
        })
        .collect()
}

/// The clusters of a cluster bootstrap and their own pairs ([`within_pairs`]), for the
/// AUROC's correction in [`weighted_metrics`].
#[derive(Clone, Copy)]
struct Within<'a> {
    members: &'a [Vec<usize>],
    pairs: &'a [(f64, u64)],
}

/// Weighted AUROC, AP and Brier of one replicate. With `within` (a cluster bootstrap), the
/// AUROC leaves out the pairs between two copies of one cluster: a patient drawn c times
/// would otherwise bring its own positive–negative comparisons c² times where every other
/// pair comes about c_a·c_b ≈ 1 time on average (E[c²] ≈ 2), so a model that ranks within
/// a patient better than across patients got replicates above the estimate, and the
/// interval could lie wholly above it (a red-team finding: a gate passed with
/// `--patient-id-column` that failed without it). Each copy keeps its own pairs once (c
/// times), as a U-statistic's bootstrap without its diagonal.
fn weighted_metrics(
    s: &Sorted,
    y: &[bool],
    p: &[f64],
    w: &[u32],
    within: Option<Within<'_>>,
) -> Replicate {
    let (mut wp, mut wn) = (0u64, 0u64);
    let mut brier = 0.0;
    for ((&y, &p), &w) in y.iter().zip(p).zip(w) {
        if w == 0 {
            continue;
        }
        if y {
            wp += u64::from(w);
        } else {
            wn += u64::from(w);
        }
        let d = p - f64::from(u8::from(y));
        brier += f64::from(w) * d * d;
    }
    let total = wp + wn;
    let brier = (total > 0).then(|| brier / total as f64);
    if wp == 0 || wn == 0 {
        return (None, None, brier, None);
    }
    // AUROC: ascending, negatives below each positive group, ties half
    let mut neg_below = 0u64;
    let mut u = 0.0f64;
    let mut group_w = Vec::with_capacity(s.groups.len());
    for &(a, b) in s.groups.iter().rev() {
        let (mut gp, mut gn) = (0u64, 0u64);
        for &i in &s.order[a..b] {
            if y[i] {
                gp += u64::from(w[i]);
            } else {
                gn += u64::from(w[i]);
            }
        }
        u += gp as f64 * (neg_below as f64 + 0.5 * gn as f64);
        neg_below += gn;
        group_w.push((gp, gn));
    }
    let (mut u_copies, mut pairs_copies) = (0.0f64, 0u64);
    if let Some(within) = within {
        for (rows, &(u_own, pairs_own)) in within.members.iter().zip(within.pairs) {
            let c = rows.first().map_or(0, |&r| u64::from(w[r]));
            if c > 1 && pairs_own > 0 {
                let copies = c * (c - 1);
                u_copies += copies as f64 * u_own;
                pairs_copies += copies * pairs_own;
            }
        }
    }
    let auroc = (u - u_copies) / (wp as f64 * wn as f64 - pairs_copies as f64);
    // AP and the ROC at the band's grid: descending
    let (mut tp, mut fp) = (0u64, 0u64);
    let mut ap = 0.0;
    let mut band = [0.0; ROC_BAND_GRID];
    let mut k = 0;
    for &(gp, gn) in group_w.iter().rev() {
        if gp + gn == 0 {
            continue;
        }
        // the curve's TPR at FPR f is the largest TPR reached with fpr <= f
        let fpr_next = (fp + gn) as f64 / wn as f64;
        while k < ROC_BAND_GRID && grid(k) < fpr_next {
            band[k] = tp as f64 / wp as f64;
            k += 1;
        }
        tp += gp;
        fp += gn;
        ap += (gp as f64 / wp as f64) * (tp as f64 / (tp + fp) as f64);
    }
    while k < ROC_BAND_GRID {
        band[k] = 1.0;
        k += 1;
    }
    (Some(auroc), Some(ap), brier, Some(band))
}

fn grid(k: usize) -> f64 {
    k as f64 / (ROC_BAND_GRID - 1) as f64
}

fn generator(seed: u64, replicate: usize) -> Xoshiro256PlusPlus {
    // distinct, well-mixed seeds per replicate (seed_from_u64 runs SplitMix64 over this)
    Xoshiro256PlusPlus::seed_from_u64(
        seed ^ (replicate as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    )
}

/// A percentile interval of the macro (unweighted mean) one-vs-rest AUROC: each replicate
/// draws one set of row weights and averages the classes' weighted AUROCs (classes without
/// both outcomes in a replicate are left out of its mean).
/// `clusters` as for [`bootstrap`]: whole clusters (patients) are resampled.
pub fn bootstrap_macro_auroc(
    columns: &[(Vec<bool>, Vec<f64>)],
    clusters: Option<(&[usize], usize)>,
    spec: BootstrapSpec,
) -> Option<BootstrapCi> {
    let n = columns.first()?.0.len();
    if n == 0 || spec.replicates == 0 {
        return None;
    }
    let sorted: Vec<Sorted> = columns.iter().map(|(_, p)| Sorted::new(p)).collect();
    let members = clusters.map(cluster_members);
    let own: Vec<Vec<(f64, u64)>> = match &members {
        Some(m) => columns.iter().map(|(y, p)| within_pairs(y, p, m)).collect(),
        None => Vec::new(),
    };
    let reps: Vec<Option<f64>> = (0..spec.replicates)
        .into_par_iter()
        .map_init(
            || vec![0u32; n],
            |w, b| {
                if spec.stopped() {
                    return None;
                }
                draw(w, members.as_deref(), spec.seed, b);
                let aucs: Vec<f64> = columns
                    .iter()
                    .zip(&sorted)
                    .enumerate()
                    .filter_map(|(k, ((y, p), s))| {
                        let within = members.as_deref().map(|members| Within {
                            members,
                            pairs: &own[k],
                        });
                        weighted_metrics(s, y, p, w, within).0
                    })
                    .collect();
                Some((!aucs.is_empty()).then(|| aucs.iter().sum::<f64>() / aucs.len() as f64))
            },
        )
        .while_some()
        .collect();
    if spec.stopped() {
        return None;
    }
    percentile_ci(reps, spec.confidence)
}

/// The rows of each cluster (`of[i]` is row i's cluster, in `0..k`), empty clusters left out.
fn cluster_members((of, k): (&[usize], usize)) -> Vec<Vec<usize>> {
    let mut m = vec![Vec::new(); k];
    for (row, &c) in of.iter().enumerate() {
        m[c].push(row);
    }
    m.retain(|v| !v.is_empty());
    m
}

/// Replicate `b`'s weights: rows drawn one by one, or (with `members`) whole clusters, as
/// many draws as there are clusters.
fn draw(w: &mut [u32], members: Option<&[Vec<usize>]>, seed: u64, b: usize) {
    match members {
        None => draw_rows(w, seed, b),
        Some(m) => {
            w.iter_mut().for_each(|v| *v = 0);
            let mut rng = generator(seed, b);
            for _ in 0..m.len() {
                for &row in &m[rng.random_range(0..m.len())] {
                    w[row] += 1;
                }
            }
        }
    }
}

/// Replicate `b`'s weights: how many times each of the `w.len()` rows was drawn.
fn draw_rows(w: &mut [u32], seed: u64, b: usize) {
    let n = w.len();
    w.iter_mut().for_each(|v| *v = 0);
    let mut rng = generator(seed, b);
    for _ in 0..n {
        w[rng.random_range(0..n)] += 1;
    }
}

fn percentile_ci(values: Vec<Option<f64>>, confidence: f64) -> Option<BootstrapCi> {
    let total = values.len();
    let mut v: Vec<f64> = values.into_iter().flatten().collect();
    if v.is_empty() {
        return None;
    }
    v.sort_unstable_by(f64::total_cmp);
    let alpha = (1.0 - confidence) / 2.0;
    Some(BootstrapCi {
        ci_lower: quantile_sorted(&v, alpha)?,
        ci_upper: quantile_sorted(&v, 1.0 - alpha)?,
        replicates: v.len(),
        replicates_skipped: total - v.len(),
    })
}

/// Bootstrap intervals for AUROC, AUPRC and Brier. `clusters[i]` is row `i`'s cluster
/// (patient) index in `0..n_clusters`; with it whole clusters are resampled.
pub fn bootstrap(
    y: &[bool],
    p: &[f64],
    clusters: Option<(&[usize], usize)>,
    spec: BootstrapSpec,
) -> BootstrapResult {
    let n = y.len();
    if n == 0 || spec.replicates == 0 {
        return BootstrapResult {
            auroc: None,
            auprc: None,
            brier: None,
            roc_band: Vec::new(),
        };
    }
    let sorted = Sorted::new(p);
    let members = clusters.map(cluster_members);
    let own = members.as_deref().map(|m| within_pairs(y, p, m));
    let within = members
        .as_deref()
        .zip(own.as_deref())
        .map(|(members, pairs)| Within { members, pairs });
    let reps: Vec<Replicate> = (0..spec.replicates)
        .into_par_iter()
        .map_init(
            || vec![0u32; n],
            |w, b| {
                if spec.stopped() {
                    return None;
                }
                draw(w, members.as_deref(), spec.seed, b);
                Some(weighted_metrics(&sorted, y, p, w, within))
            },
        )
        .while_some()
        .collect();
    if spec.stopped() {
        return BootstrapResult {
            auroc: None,
            auprc: None,
            brier: None,
            roc_band: Vec::new(),
        };
    }
    let ci = |values: Vec<Option<f64>>| percentile_ci(values, spec.confidence);
    let roc_band = (0..ROC_BAND_GRID)
        .filter_map(|k| {
            let c = ci(reps.iter().map(|r| r.3.map(|b| b[k])).collect())?;
            Some(RocBandPoint {
                fpr: grid(k),
                tpr_lower: c.ci_lower,
                tpr_upper: c.ci_upper,
            })
        })
        .collect();
    BootstrapResult {
        auroc: ci(reps.iter().map(|r| r.0).collect()),
        auprc: ci(reps.iter().map(|r| r.1).collect()),
        brier: ci(reps.iter().map(|r| r.2).collect()),
        roc_band,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics;

    #[test]
    fn weighted_metrics_equal_the_metrics_of_the_resampled_rows() {
        let y = [true, false, true, false, true, false, false];
        let p = [0.9, 0.4, 0.4, 0.1, 0.7, 0.7, 0.2];
        let w = [2u32, 0, 1, 3, 1, 1, 0];
        let (ry, rp): (Vec<bool>, Vec<f64>) = (0..y.len())
            .flat_map(|i| std::iter::repeat_n((y[i], p[i]), w[i] as usize))
            .unzip();
        let (auc, ap, brier, band) = weighted_metrics(&Sorted::new(&p), &y, &p, &w, None);
        // the band's TPR at each FPR of the grid: the largest TPR with fpr <= f
        let roc = metrics::roc_curve(&ry, &rp);
        for (k, b) in band.unwrap().iter().enumerate() {
            let f = grid(k);
            let want = roc
                .iter()
                .filter(|r| r.fpr <= f + 1e-12)
                .map(|r| r.tpr)
                .fold(0.0, f64::max);
            assert!((b - want).abs() < 1e-12, "fpr {f}: {b} vs {want}");
        }
        assert!((auc.unwrap() - metrics::auroc(&ry, &rp).unwrap()).abs() < 1e-15);
        assert!((ap.unwrap() - metrics::average_precision(&ry, &rp).unwrap()).abs() < 1e-15);
        assert!((brier.unwrap() - metrics::brier(&ry, &rp).unwrap()).abs() < 1e-15);
    }

    #[test]
    fn reproducible_for_a_seed_and_thread_count_free() {
        let y: Vec<bool> = (0..200).map(|i| i % 3 == 0).collect();
        let p: Vec<f64> = (0..200).map(|i| ((i * 37) % 101) as f64 / 100.0).collect();
        let spec = BootstrapSpec {
            replicates: 300,
            seed: 7,
            confidence: 0.95,
            stop: None,
        };
        let a = bootstrap(&y, &p, None, spec.clone());
        let b = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap()
            .install(|| bootstrap(&y, &p, None, spec.clone()));
        assert_eq!(a, b);
        let c = bootstrap(&y, &p, None, BootstrapSpec { seed: 8, ..spec });
        assert_ne!(a, c);
    }

    #[test]
    fn one_class_replicates_are_skipped_not_nan() {
        // one positive among 50: many replicates draw none
        let y: Vec<bool> = (0..50).map(|i| i == 0).collect();
        let p: Vec<f64> = (0..50).map(|i| i as f64 / 50.0).collect();
        let r = bootstrap(
            &y,
            &p,
            None,
            BootstrapSpec {
                replicates: 200,
                seed: 1,
                confidence: 0.95,
                stop: None,
            },
        );
        let auc = r.auroc.unwrap();
        assert!(auc.replicates_skipped > 0);
        assert_eq!(auc.replicates + auc.replicates_skipped, 200);
        assert!(auc.ci_lower.is_finite() && auc.ci_upper.is_finite());
    }

    #[test]
    fn clusters_resample_whole_patients() {
        // two rows per patient with identical scores and labels: every replicate has an even
        // weight per row pair, so the replicate statistics equal those of the patient level
        let y: Vec<bool> = (0..40).map(|i| (i / 2) % 2 == 0).collect();
        let p: Vec<f64> = (0..40).map(|i| ((i / 2) * 7 % 20) as f64 / 20.0).collect();
        let clusters: Vec<usize> = (0..40).map(|i| i / 2).collect();
        let spec = BootstrapSpec {
            replicates: 100,
            seed: 3,
            confidence: 0.9,
            stop: None,
        };
        let r = bootstrap(&y, &p, Some((&clusters, 20)), spec.clone());
        assert!(r.auroc.is_some());
        assert_eq!(r, bootstrap(&y, &p, Some((&clusters, 20)), spec));
    }

    /// Red-team finding: with a positive and a negative row per patient, ranked right within
    /// every patient and at random across them (a per-patient offset in the scores), the
    /// pairs between two copies of a patient drawn twice pushed every replicate's AUROC
    /// above the estimate, and the 95 % interval lay wholly above it. Without those pairs
    /// the replicates centre on the estimate.
    #[test]
    fn a_patient_drawn_twice_does_not_compare_with_its_copy() {
        let k = 40;
        let offset = |i: usize| ((i * 7919) % 97) as f64 / 97.0;
        let y: Vec<bool> = (0..2 * k).map(|r| r % 2 == 0).collect();
        let p: Vec<f64> = (0..2 * k)
            .map(|r| offset(r / 2) + if r % 2 == 0 { 0.05 } else { 0.0 })
            .collect();
        let clusters: Vec<usize> = (0..2 * k).map(|r| r / 2).collect();
        let value = metrics::auroc(&y, &p).unwrap();
        let spec = BootstrapSpec {
            replicates: 2000,
            seed: 11,
            confidence: 0.95,
            stop: None,
        };
        let ci = bootstrap(&y, &p, Some((&clusters, k)), spec.clone())
            .auroc
            .unwrap();
        assert!(
            ci.ci_lower < value && value < ci.ci_upper,
            "{value} outside [{}, {}]",
            ci.ci_lower,
            ci.ci_upper
        );
        let columns = vec![(y.clone(), p.clone())];
        let macro_ci = bootstrap_macro_auroc(&columns, Some((&clusters, k)), spec).unwrap();
        assert_eq!(macro_ci, ci, "one class column: the same replicates");
    }

    /// Two identical rows per patient: the cluster bootstrap of the macro AUROC draws each
    /// patient's pair as the row bootstrap draws the patient's one row (same draws), so the
    /// intervals are those of the patient-level rows.
    #[test]
    fn macro_auroc_clusters_resample_whole_patients() {
        let patients = 30;
        let y: Vec<usize> = (0..patients).map(|i| (i * 7) % 3).collect();
        let p: Vec<f64> = (0..patients * 3)
            .map(|i| ((i * 37) % 101) as f64 / 100.0)
            .collect();
        let columns = |rows: &[usize]| -> Vec<(Vec<bool>, Vec<f64>)> {
            (0..3)
                .map(|c| {
                    (
                        rows.iter().map(|&r| y[r] == c).collect(),
                        rows.iter().map(|&r| p[r * 3 + c]).collect(),
                    )
                })
                .collect()
        };
        let spec = BootstrapSpec {
            replicates: 200,
            seed: 5,
            confidence: 0.95,
            stop: None,
        };
        let single: Vec<usize> = (0..patients).collect();
        let doubled: Vec<usize> = (0..patients * 2).map(|i| i / 2).collect();
        let by_row = bootstrap_macro_auroc(&columns(&single), None, spec.clone()).unwrap();
        let by_patient =
            bootstrap_macro_auroc(&columns(&doubled), Some((&doubled, patients)), spec.clone())
                .unwrap();
        assert!((by_row.ci_lower - by_patient.ci_lower).abs() < 1e-12);
        assert!((by_row.ci_upper - by_patient.ci_upper).abs() < 1e-12);
        // Taken as independent rows, the doubled set's interval is narrower.
        let naive = bootstrap_macro_auroc(&columns(&doubled), None, spec).unwrap();
        assert!(naive.ci_upper - naive.ci_lower < by_patient.ci_upper - by_patient.ci_lower);
    }

    /// Red-team finding: a stopped run's bootstrap held every thread of the shared pool for
    /// minutes. Set, the flag stops it: no interval is computed from what was drawn.
    #[test]
    fn a_stopped_bootstrap_draws_no_more_and_gives_no_interval() {
        let y: Vec<bool> = (0..200).map(|i| i % 3 == 0).collect();
        let p: Vec<f64> = (0..200).map(|i| ((i * 37) % 101) as f64 / 100.0).collect();
        let stop = Stop::default();
        let spec = BootstrapSpec {
            replicates: 1_000_000,
            seed: 7,
            confidence: 0.95,
            stop: Some(stop.clone()),
        };
        stop.0.store(true, std::sync::atomic::Ordering::Relaxed);
        let r = bootstrap(&y, &p, None, spec.clone());
        assert_eq!((r.auroc, r.auprc, r.brier), (None, None, None));
        assert!(r.roc_band.is_empty());
        let columns = vec![(y.clone(), p.clone())];
        assert_eq!(bootstrap_macro_auroc(&columns, None, spec.clone()), None);
        // Set while it runs (from another thread): it ends without drawing the million.
        let late = Stop::default();
        let setter = {
            let late = late.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                late.0.store(true, std::sync::atomic::Ordering::Relaxed);
            })
        };
        let r = bootstrap(
            &y,
            &p,
            None,
            BootstrapSpec {
                stop: Some(late),
                ..spec
            },
        );
        setter.join().unwrap();
        assert_eq!(r.auroc, None);
    }
}
