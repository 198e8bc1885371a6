//! Binary-classification metrics on scores and 0/1 labels, each with the definition a
//! reference implementation uses (scikit-learn unless stated), so that the numbers can be
//! checked against it to floating-point precision.
//!
//! Conventions: `y[i]` is `true` for the positive class; `p[i]` is the model's score for the
//! positive class (a probability for calibration metrics); an operating point `t` calls a
//! row positive when `p >= t`, the rule the bundles' `[[thresholds]]` declare.

use std::cmp::Ordering;

use serde::Serialize;
use statrs::distribution::{ContinuousCDF, Normal};

/// The two-sided standard normal quantile for a confidence level (0.95 → 1.959963984540054).
pub fn z_for(confidence: f64) -> f64 {
    let normal = Normal::standard();
    normal.inverse_cdf(0.5 + confidence / 2.0)
}

/// Two-sided p-value of a standard normal statistic.
pub fn two_sided_p(z: f64) -> f64 {
    let normal = Normal::standard();
    2.0 * normal.cdf(-z.abs())
}

/// Positives and negatives.
pub fn class_counts(y: &[bool]) -> (usize, usize) {
    let pos = y.iter().filter(|&&v| v).count();
    (pos, y.len() - pos)
}

fn total_cmp(a: &f64, b: &f64) -> Ordering {
    a.total_cmp(b)
}

/// 1-based mid-ranks (ties share the mean of their ranks), as `scipy.stats.rankdata`.
pub fn midranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_unstable_by(|&a, &b| total_cmp(&x[a], &x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        // ranks i+1 ..= j+1 share their mean
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = r;
        }
        i = j + 1;
    }
    ranks
}

/// The area under the ROC curve (the Mann-Whitney statistic with ties counted half), as
/// `sklearn.metrics.roc_auc_score`. `None` with only one class.
pub fn auroc(y: &[bool], p: &[f64]) -> Option<f64> {
    let (m, n) = class_counts(y);
    if m == 0 || n == 0 {
        return None;
    }
    let ranks = midranks(p);
    let pos_rank_sum: f64 = ranks
        .iter()
        .zip(y)
        .filter(|(_, y)| **y)
        .map(|(r, _)| r)
        .sum();
    let m = m as f64;
    Some((pos_rank_sum - m * (m + 1.0) / 2.0) / (m * n as f64))
}

/// DeLong's structural components (Sun & Xu's fast algorithm): for each positive, the share of
/// negatives it outranks (`v10`); for each negative, the share of positives that outrank it
/// (`v01`).
struct Components {
    v10: Vec<f64>,
    v01: Vec<f64>,
}

fn components(y: &[bool], p: &[f64]) -> Components {
    let x: Vec<f64> = p
        .iter()
        .zip(y)
        .filter(|(_, y)| **y)
        .map(|(p, _)| *p)
        .collect();
    let yn: Vec<f64> = p
        .iter()
        .zip(y)
        .filter(|(_, y)| !**y)
        .map(|(p, _)| *p)
        .collect();
    let (m, n) = (x.len(), yn.len());
    let tx = midranks(&x);
    let ty = midranks(&yn);
    let mut z = x.clone();
    z.extend_from_slice(&yn);
    let tz = midranks(&z);
    let v10 = (0..m).map(|i| (tz[i] - tx[i]) / n as f64).collect();
    let v01 = (0..n)
        .map(|j| 1.0 - (tz[m + j] - ty[j]) / m as f64)
        .collect();
    Components { v10, v01 }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Sample covariance (n − 1 in the denominator).
fn cov(a: &[f64], b: &[f64]) -> f64 {
    let (ma, mb) = (mean(a), mean(b));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - ma) * (y - mb))
        .sum::<f64>()
        / (a.len() as f64 - 1.0)
}

/// AUROC with DeLong's variance and a Wald interval (clipped to [0, 1]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct DeLong {
    pub auc: f64,
    pub variance: f64,
    /// `None` (with `ci_upper`) when the variance is degenerate: see [`delong`].
    pub ci_lower: Option<f64>,
    pub ci_upper: Option<f64>,
}

/// DeLong, DeLong & Clarke-Pearson (1988). `None` with fewer than two of either class.
///
/// The interval is `None` when the estimated variance is zero because every structural
/// component of each class is the same: every positive outranks the same share of negatives
/// and every negative is outranked by the same share of positives. That is the case at
/// AUROC 0 or 1 (a perfect ranking of any number of rows, two and two included) and when each
/// class's scores are all tied. The variance estimate is then zero by construction, not
/// because the AUROC is known exactly; a Wald interval of zero width ([1, 1] for a perfect
/// ranking of four rows) would pass any floor on its lower limit with no evidence behind it.
/// The test is on the components, not on `variance == 0.0`, so that rounding in the
/// covariance of equal components cannot leave a width of ~1e-17 that looks like an interval.
pub fn delong(y: &[bool], p: &[f64], confidence: f64) -> Option<DeLong> {
    let (m, n) = class_counts(y);
    if m < 2 || n < 2 {
        return None;
    }
    let c = components(y, p);
    let auc = mean(&c.v10);
    let variance = cov(&c.v10, &c.v10) / m as f64 + cov(&c.v01, &c.v01) / n as f64;
    let constant = |v: &[f64]| v.iter().all(|&x| x == v[0]);
    let (ci_lower, ci_upper) = if constant(&c.v10) && constant(&c.v01) {
        (None, None)
    } else {
        let half = z_for(confidence) * variance.sqrt();
        (Some((auc - half).max(0.0)), Some((auc + half).min(1.0)))
    };
    Some(DeLong {
        auc,
        variance,
        ci_lower,
        ci_upper,
    })
}

/// DeLong's test of two correlated AUROCs (two models scored on the same rows).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PairedDeLong {
    pub auc_a: f64,
    pub auc_b: f64,
    /// `auc_b − auc_a`.
    pub difference: f64,
    pub standard_error: f64,
    pub z: f64,
    pub p_value: f64,
    pub ci_lower: f64,
    pub ci_upper: f64,
}

pub fn delong_paired(y: &[bool], a: &[f64], b: &[f64], confidence: f64) -> Option<PairedDeLong> {
    let (m, n) = class_counts(y);
    if m < 2 || n < 2 || a.len() != b.len() {
        return None;
    }
    let ca = components(y, a);
    let cb = components(y, b);
    let (auc_a, auc_b) = (mean(&ca.v10), mean(&cb.v10));
    let var = |x: &Components, z: &Components| {
        cov(&x.v10, &z.v10) / m as f64 + cov(&x.v01, &z.v01) / n as f64
    };
    let v = var(&ca, &ca) + var(&cb, &cb) - 2.0 * var(&ca, &cb);
    let se = v.max(0.0).sqrt();
    let difference = auc_b - auc_a;
    let (z, p_value) = if se > 0.0 {
        let z = difference / se;
        (z, two_sided_p(z))
    } else if difference == 0.0 {
        (0.0, 1.0)
    } else {
        (f64::INFINITY.copysign(difference), 0.0)
    };
    let half = z_for(confidence) * se;
    Some(PairedDeLong {
        auc_a,
        auc_b,
        difference,
        standard_error: se,
        z,
        p_value,
        ci_lower: difference - half,
        ci_upper: difference + half,
    })
}

/// Row indices sorted by score, descending, cut into `[start, end)` groups of equal score.
pub(crate) fn groups_descending(p: &[f64]) -> (Vec<usize>, Vec<(usize, usize)>) {
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_unstable_by(|&a, &b| total_cmp(&p[b], &p[a]));
    let mut groups = Vec::new();
    let mut i = 0;
    while i < order.len() {
        let mut j = i + 1;
        while j < order.len() && p[order[j]] == p[order[i]] {
            j += 1;
        }
        groups.push((i, j));
        i = j;
    }
    (order, groups)
}

/// Average precision, as `sklearn.metrics.average_precision_score`: Σ (Rₖ − Rₖ₋₁) Pₖ over the
/// distinct scores, descending. `None` without positives.
pub fn average_precision(y: &[bool], p: &[f64]) -> Option<f64> {
    let (pos, _) = class_counts(y);
    if pos == 0 {
        return None;
    }
    let (order, groups) = groups_descending(p);
    let (mut tp, mut fp, mut ap) = (0usize, 0usize, 0.0);
    for (a, b) in groups {
        let gp = order[a..b].iter().filter(|&&i| y[i]).count();
        tp += gp;
        fp += (b - a) - gp;
        ap += (gp as f64 / pos as f64) * (tp as f64 / (tp + fp) as f64);
    }
    // A sum of shares of 1 may round past it (1.0000000000000007 on a perfect ranking).
    Some(ap.min(1.0))
}

/// A point of the ROC curve: rows with `p >= threshold` called positive.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RocPoint {
    pub threshold: f64,
    pub fpr: f64,
    pub tpr: f64,
}

/// The ROC curve at every distinct score, from (0, 0) (threshold above every score, written
/// as the largest score + 1 as scikit-learn ≥ 1.3 does with `inf`) to (1, 1).
pub fn roc_curve(y: &[bool], p: &[f64]) -> Vec<RocPoint> {
    let (pos, neg) = class_counts(y);
    if pos == 0 || neg == 0 {
        return Vec::new();
    }
    let (order, groups) = groups_descending(p);
    let top = order.first().map_or(1.0, |&i| p[i] + 1.0);
    let mut out = vec![RocPoint {
        threshold: top,
        fpr: 0.0,
        tpr: 0.0,
    }];
    let (mut tp, mut fp) = (0usize, 0usize);
    for (a, b) in groups {
        let gp = order[a..b].iter().filter(|&&i| y[i]).count();
        tp += gp;
        fp += (b - a) - gp;
        out.push(RocPoint {
            threshold: p[order[a]],
            fpr: fp as f64 / neg as f64,
            tpr: tp as f64 / pos as f64,
        });
    }
    out
}

/// A point of the precision–recall curve.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PrPoint {
    pub threshold: f64,
    pub precision: f64,
    pub recall: f64,
}

/// Precision and recall at every distinct score, descending (recall rising).
pub fn pr_curve(y: &[bool], p: &[f64]) -> Vec<PrPoint> {
    let (pos, _) = class_counts(y);
    if pos == 0 {
        return Vec::new();
    }
    let (order, groups) = groups_descending(p);
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut out = Vec::with_capacity(groups.len());
    for (a, b) in groups {
        let gp = order[a..b].iter().filter(|&&i| y[i]).count();
        tp += gp;
        fp += (b - a) - gp;
        out.push(PrPoint {
            threshold: p[order[a]],
            precision: tp as f64 / (tp + fp) as f64,
            recall: tp as f64 / pos as f64,
        });
    }
    out
}

/// At most `max` points of a curve, evenly spaced along it, first and last kept.
pub fn thin<T: Copy>(points: &[T], max: usize) -> Vec<T> {
    if points.len() <= max || max < 2 {
        return points.to_vec();
    }
    let step = (points.len() - 1) as f64 / (max - 1) as f64;
    (0..max)
        .map(|k| points[((k as f64 * step).round() as usize).min(points.len() - 1)])
        .collect()
}

/// The 2 × 2 table at an operating point (`p >= threshold` is positive).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Confusion {
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
}

pub fn confusion(y: &[bool], p: &[f64], threshold: f64) -> Confusion {
    let mut c = Confusion::default();
    for (&y, &p) in y.iter().zip(p) {
        match (p >= threshold, y) {
            (true, true) => c.tp += 1,
            (true, false) => c.fp += 1,
            (false, false) => c.tn += 1,
            (false, true) => c.fn_ += 1,
        }
    }
    c
}

/// A proportion `k / n` with its Wilson score interval, as
/// `statsmodels.stats.proportion.proportion_confint(k, n, method="wilson")`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Proportion {
    pub value: f64,
    pub ci_lower: f64,
    pub ci_upper: f64,
    pub k: usize,
    pub n: usize,
}

/// `None` when `n == 0`.
pub fn wilson(k: usize, n: usize, confidence: f64) -> Option<Proportion> {
    if n == 0 {
        return None;
    }
    let z = z_for(confidence);
    let (kf, nf) = (k as f64, n as f64);
    let phat = kf / nf;
    let z2 = z * z;
    let denom = 1.0 + z2 / nf;
    let centre = (phat + z2 / (2.0 * nf)) / denom;
    let half = z * (phat * (1.0 - phat) / nf + z2 / (4.0 * nf * nf)).sqrt() / denom;
    // k = 0 and k = n have the limits 0 and 1 exactly (rounding leaves ~1e-17)
    Some(Proportion {
        value: phat,
        ci_lower: if k == 0 {
            0.0
        } else {
            (centre - half).max(0.0)
        },
        ci_upper: if k == n {
            1.0
        } else {
            (centre + half).min(1.0)
        },
        k,
        n,
    })
}

impl Confusion {
    pub fn n(&self) -> usize {
        self.tp + self.fp + self.tn + self.fn_
    }
    pub fn sensitivity(&self, confidence: f64) -> Option<Proportion> {
        wilson(self.tp, self.tp + self.fn_, confidence)
    }
    pub fn specificity(&self, confidence: f64) -> Option<Proportion> {
        wilson(self.tn, self.tn + self.fp, confidence)
    }
    pub fn ppv(&self, confidence: f64) -> Option<Proportion> {
        wilson(self.tp, self.tp + self.fp, confidence)
    }
    pub fn npv(&self, confidence: f64) -> Option<Proportion> {
        wilson(self.tn, self.tn + self.fn_, confidence)
    }
    pub fn accuracy(&self, confidence: f64) -> Option<Proportion> {
        wilson(self.tp + self.tn, self.n(), confidence)
    }
    /// 2TP / (2TP + FP + FN), as `sklearn.metrics.f1_score`; `None` when it is 0 / 0.
    pub fn f1(&self) -> Option<f64> {
        let d = 2 * self.tp + self.fp + self.fn_;
        (d > 0).then(|| 2.0 * self.tp as f64 / d as f64)
    }
}

/// The largest score `t` with sensitivity(`p >= t`) ≥ `target`; `None` without positives.
pub fn threshold_for_sensitivity(y: &[bool], p: &[f64], target: f64) -> Option<f64> {
    let (pos, _) = class_counts(y);
    if pos == 0 {
        return None;
    }
    let (order, groups) = groups_descending(p);
    let mut tp = 0usize;
    for (a, b) in groups {
        tp += order[a..b].iter().filter(|&&i| y[i]).count();
        if tp as f64 / pos as f64 >= target {
            return Some(p[order[a]]);
        }
    }
    None
}

/// The smallest score `t` with specificity(`p >= t`) ≥ `target`; `None` without negatives
/// or when only a threshold above every score would reach it.
pub fn threshold_for_specificity(y: &[bool], p: &[f64], target: f64) -> Option<f64> {
    let (_, neg) = class_counts(y);
    if neg == 0 {
        return None;
    }
    let (order, groups) = groups_descending(p);
    // ascending: negatives strictly below the group's score are true negatives
    let mut below = neg;
    let mut best = None;
    for (a, b) in groups {
        // at t = this group's score, negatives with p < t are those after this group
        let gn = order[a..b].iter().filter(|&&i| !y[i]).count();
        below -= gn;
        if below as f64 / neg as f64 >= target {
            best = Some(p[order[a]]);
        } else {
            break;
        }
    }
    best
}

/// Mean squared difference between score and outcome, as `sklearn.metrics.brier_score_loss`.
pub fn brier(y: &[bool], p: &[f64]) -> Option<f64> {
    if y.is_empty() {
        return None;
    }
    Some(
        y.iter()
            .zip(p)
            .map(|(&y, &p)| (p - f64::from(u8::from(y))).powi(2))
            .sum::<f64>()
            / y.len() as f64,
    )
}

/// Probabilities are clipped to `[CLIP, 1 − CLIP]` before their logit is taken.
pub const CLIP: f64 = 1e-12;

/// `ln(p / (1 − p))` of a clipped probability.
pub fn logit(p: f64) -> f64 {
    let p = p.clamp(CLIP, 1.0 - CLIP);
    (p / (1.0 - p)).ln()
}

/// A maximum-likelihood logistic fit of one or two coefficients, with Wald intervals.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Estimate {
    pub value: f64,
    pub ci_lower: f64,
    pub ci_upper: f64,
    pub standard_error: f64,
}

/// Logistic calibration: the slope of `logit P(y) = a + b·logit(p)` and the
/// calibration-in-the-large intercept `a` of `logit P(y) = a + logit(p)` (an offset), as
/// statsmodels' `Logit` / `GLM(Binomial, offset=…)` fit them (Cox 1958; Van Calster et al.
/// 2019).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Calibration {
    /// Calibration-in-the-large: `a` of `logit P(y) = a + logit(p)`. It has a maximum
    /// whenever both classes are present among the scores that are not exactly 0 or 1, and
    /// no score of exactly 0 or 1 is contradicted by its label (otherwise the maximum is at
    /// infinity): `None` then.
    pub intercept: Option<Estimate>,
    /// `b` of `logit P(y) = a + b·logit(p)`: `None` for separable scores ([`separable`]),
    /// where no maximum exists, or all scores equal.
    pub slope: Option<Estimate>,
}

/// `None` with one class only. The intercept and the slope are fitted apart: the slope has
/// no maximum on separated scores, the intercept does (it was reported undefined with the
/// slope: a red-team finding, statsmodels' offset GLM gives it).
pub fn calibration(y: &[bool], p: &[f64], confidence: f64) -> Option<Calibration> {
    let (pos, neg) = class_counts(y);
    if pos == 0 || neg == 0 {
        return None;
    }
    let x: Vec<f64> = p.iter().map(|&p| logit(p)).collect();
    let z = z_for(confidence);
    let est = |value: f64, var: f64| {
        let se = var.sqrt();
        Estimate {
            value,
            ci_lower: value - z * se,
            ci_upper: value + z * se,
            standard_error: se,
        }
    };
    // A score of exactly 0 or 1 that its label contradicts has a likelihood of 0 however
    // the intercept moves: the fit's maximum is at infinity, and the finite value found is
    // an artefact of the logit's clipping (13.65 with a standard error of 544 was
    // reported: a red-team finding). A fit whose information is nil (every score clipped)
    // says nothing either.
    // Rows of a clipped score that agrees with its label have a likelihood of 1 for every
    // finite intercept: only the others place it, and they need both classes (else the
    // maximum is at infinity too).
    let clipped = |p: f64| p <= CLIP || p >= 1.0 - CLIP;
    let contradicted = y
        .iter()
        .zip(p)
        .any(|(&y, &p)| if y { p <= CLIP } else { p >= 1.0 - CLIP });
    let (open_pos, open_neg) =
        y.iter()
            .zip(p)
            .filter(|(_, p)| !clipped(**p))
            .fold(
                (0usize, 0usize),
                |(a, b), (&y, _)| {
                    if y { (a + 1, b) } else { (a, b + 1) }
                },
            );
    let intercept = newton_offset(y, &x)
        .filter(|_| !contradicted && open_pos > 0 && open_neg > 0)
        .map(|(a, var_a)| est(a, var_a));
    Some(Calibration {
        intercept,
        slope: newton_slope(y, &x).map(|([_, b], cov)| est(b, cov[1][1])),
    })
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Bernoulli log-likelihood of linear predictors `eta`.
fn loglik(y: &[bool], eta: impl Iterator<Item = f64>) -> f64 {
    y.iter()
        .zip(eta)
        .map(|(&y, e)| {
            // log σ(e) = −log(1 + e^−e), log(1 − σ(e)) = −log(1 + e^e)
            let softplus = |t: f64| {
                if t > 0.0 {
                    t + (-t).exp().ln_1p()
                } else {
                    t.exp().ln_1p()
                }
            };
            if y { -softplus(-e) } else { -softplus(e) }
        })
        .sum()
}

const MAX_ITER: usize = 100;

/// Intercept `a` of `logit P(y) = a + x` (x an offset); its variance.
fn newton_offset(y: &[bool], x: &[f64]) -> Option<(f64, f64)> {
    let mut a = 0.0;
    let mut ll = loglik(y, x.iter().map(|x| a + x));
    for _ in 0..MAX_ITER {
        let (mut g, mut h) = (0.0, 0.0);
        for (&y, &x) in y.iter().zip(x) {
            let m = sigmoid(a + x);
            g += f64::from(u8::from(y)) - m;
            h += m * (1.0 - m);
        }
        if h <= 0.0 || !h.is_finite() {
            return None;
        }
        let mut step = g / h;
        // Newton's decrement: the log-likelihood a full step would gain. Below rounding of
        // the log-likelihood, a is at the maximum even if the step does not look small.
        let decrement = g * step;
        let mut next = a + step;
        let mut next_ll = loglik(y, x.iter().map(|x| next + x));
        let mut halvings = 0;
        while next_ll < ll - 1e-12 * ll.abs() && halvings < 50 {
            step /= 2.0;
            next = a + step;
            next_ll = loglik(y, x.iter().map(|x| next + x));
            halvings += 1;
        }
        a = next;
        ll = next_ll;
        if step.abs() < 1e-12 * (1.0 + a.abs()) || decrement.abs() <= 1e-15 * (1.0 + ll.abs()) {
            let h: f64 = x
                .iter()
                .map(|x| sigmoid(a + x))
                .map(|m| m * (1.0 - m))
                .sum();
            return Some((a, 1.0 / h));
        }
    }
    None
}

/// Whether a threshold on `x` puts every positive on one side and every negative on the
/// other, ties at the threshold allowed (complete or quasi-complete separation): the
/// likelihood of `logit P(y) = a + b·x` then grows without bound as |b| does, and no
/// maximum exists (statsmodels: "Perfect separation detected").
fn separable(y: &[bool], x: &[f64]) -> bool {
    let (mut pos_min, mut pos_max) = (f64::INFINITY, f64::NEG_INFINITY);
    let (mut neg_min, mut neg_max) = (f64::INFINITY, f64::NEG_INFINITY);
    for (&y, &x) in y.iter().zip(x) {
        if y {
            pos_min = pos_min.min(x);
            pos_max = pos_max.max(x);
        } else {
            neg_min = neg_min.min(x);
            neg_max = neg_max.max(x);
        }
    }
    neg_max <= pos_min || pos_max <= neg_min
}

/// `[a, b]` of `logit P(y) = a + b·x`; their covariance (the inverse Fisher information).
/// `None` for separable data ([`separable`]): Newton's steps there shrink as the slope grows
/// (the likelihood flattens towards its supremum), and stopping on a small step reported an
/// arbitrary finite slope (320 with a standard error of 1e11).
fn newton_slope(y: &[bool], x: &[f64]) -> Option<([f64; 2], [[f64; 2]; 2])> {
    if separable(y, x) {
        return None;
    }
    let (mut a, mut b) = (0.0, 1.0);
    let mut ll = loglik(y, x.iter().map(|x| a + b * x));
    let info = |a: f64, b: f64| {
        let (mut h00, mut h01, mut h11) = (0.0, 0.0, 0.0);
        for &x in x {
            let m = sigmoid(a + b * x);
            let w = m * (1.0 - m);
            h00 += w;
            h01 += w * x;
            h11 += w * x * x;
        }
        (h00, h01, h11)
    };
    for _ in 0..MAX_ITER {
        let (mut g0, mut g1) = (0.0, 0.0);
        for (&y, &x) in y.iter().zip(x) {
            let r = f64::from(u8::from(y)) - sigmoid(a + b * x);
            g0 += r;
            g1 += r * x;
        }
        let (h00, h01, h11) = info(a, b);
        let det = h00 * h11 - h01 * h01;
        if det <= 0.0 || !det.is_finite() {
            return None;
        }
        let mut d0 = (h11 * g0 - h01 * g1) / det;
        let mut d1 = (h00 * g1 - h01 * g0) / det;
        // Newton's decrement (see `newton_offset`): with scores of exactly 0 and 1 the step
        // in `a` never got under an absolute 1e-12 from rounding at x = ±27.6, and a fit
        // statsmodels converges was reported as not converging (red-team).
        let decrement = g0 * d0 + g1 * d1;
        let mut halvings = 0;
        let (mut na, mut nb) = (a + d0, b + d1);
        let mut next_ll = loglik(y, x.iter().map(|x| na + nb * x));
        while next_ll < ll - 1e-12 * ll.abs() && halvings < 50 {
            d0 /= 2.0;
            d1 /= 2.0;
            na = a + d0;
            nb = b + d1;
            next_ll = loglik(y, x.iter().map(|x| na + nb * x));
            halvings += 1;
        }
        a = na;
        b = nb;
        ll = next_ll;
        if !a.is_finite() || !b.is_finite() {
            return None;
        }
        if (d0.abs() < 1e-12 * (1.0 + a.abs()) && d1.abs() < 1e-12 * (1.0 + b.abs()))
            || decrement.abs() <= 1e-15 * (1.0 + ll.abs())
        {
            let (h00, h01, h11) = info(a, b);
            let det = h00 * h11 - h01 * h01;
            if det <= 0.0 {
                return None;
            }
            let cov = [[h11 / det, -h01 / det], [-h01 / det, h00 / det]];
            return Some(([a, b], cov));
        }
    }
    None
}

/// One bin of the reliability table.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct ReliabilityBin {
    pub lower: f64,
    pub upper: f64,
    pub n: usize,
    /// Mean score of the bin's rows (`None` when empty).
    pub mean_predicted: Option<f64>,
    /// Observed positive rate of the bin's rows.
    pub observed: Option<f64>,
}

/// Expected calibration error over `bins` equal-width bins, Σ (nᵦ / N)·|observedᵦ −
/// predictedᵦ|, with the bin edges and assignment of
/// `sklearn.calibration.calibration_curve(strategy="uniform")`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Reliability {
    pub ece: f64,
    /// The largest |observed − predicted| over the non-empty bins.
    pub mce: f64,
    pub bins: Vec<ReliabilityBin>,
}

pub fn reliability(y: &[bool], p: &[f64], bins: usize) -> Option<Reliability> {
    if y.is_empty() || bins == 0 {
        return None;
    }
    // numpy.linspace(0, 1, bins + 1): i · (1 / bins), the last edge exactly 1
    let step = 1.0 / bins as f64;
    let edges: Vec<f64> = (0..=bins)
        .map(|i| if i == bins { 1.0 } else { i as f64 * step })
        .collect();
    let interior = &edges[1..bins];
    let mut n = vec![0usize; bins];
    let mut sp = vec![0.0; bins];
    let mut sy = vec![0.0; bins];
    for (&y, &p) in y.iter().zip(p) {
        // numpy.searchsorted(interior, p) (side="left", as calibration_curve calls it): a
        // score on an edge goes to the bin below (it went above, against scikit-learn's
        // ECE for rounded scores: a red-team finding)
        let b = interior.partition_point(|&e| e < p);
        n[b] += 1;
        sp[b] += p;
        sy[b] += f64::from(u8::from(y));
    }
    let total = y.len() as f64;
    let (mut ece, mut mce) = (0.0, 0.0f64);
    let mut table = Vec::with_capacity(bins);
    for b in 0..bins {
        let (mp, ob) = if n[b] > 0 {
            let mp = sp[b] / n[b] as f64;
            let ob = sy[b] / n[b] as f64;
            ece += n[b] as f64 / total * (ob - mp).abs();
            mce = mce.max((ob - mp).abs());
            (Some(mp), Some(ob))
        } else {
            (None, None)
        };
        table.push(ReliabilityBin {
            lower: edges[b],
            upper: edges[b + 1],
            n: n[b],
            mean_predicted: mp,
            observed: ob,
        });
    }
    Some(Reliability {
        ece,
        mce,
        bins: table,
    })
}

/// Net benefit at a threshold probability (Vickers & Elkin 2006).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct DecisionPoint {
    pub threshold: f64,
    /// TP/N − FP/N · t / (1 − t), treating rows with `p >= t`.
    pub net_benefit: f64,
    /// Treat everyone: prevalence − (1 − prevalence) · t / (1 − t). Treat none is 0.
    pub treat_all: f64,
}

/// Net benefit at each threshold in `thresholds` (each in (0, 1)).
pub fn decision_curve(y: &[bool], p: &[f64], thresholds: &[f64]) -> Vec<DecisionPoint> {
    let n = y.len();
    if n == 0 {
        return Vec::new();
    }
    let (pos, _) = class_counts(y);
    let prevalence = pos as f64 / n as f64;
    // scores ascending with the positives among the rows at or above each position
    let mut rows: Vec<(f64, bool)> = p.iter().copied().zip(y.iter().copied()).collect();
    rows.sort_unstable_by(|a, b| total_cmp(&a.0, &b.0));
    let mut pos_at_or_above = vec![0usize; n + 1];
    for i in (0..n).rev() {
        pos_at_or_above[i] = pos_at_or_above[i + 1] + usize::from(rows[i].1);
    }
    thresholds
        .iter()
        .filter(|t| **t > 0.0 && **t < 1.0)
        .map(|&t| {
            let first = rows.partition_point(|r| r.0 < t);
            let treated = n - first;
            let tp = pos_at_or_above[first];
            let fp = treated - tp;
            let odds = t / (1.0 - t);
            DecisionPoint {
                threshold: t,
                net_benefit: tp as f64 / n as f64 - fp as f64 / n as f64 * odds,
                treat_all: prevalence - (1.0 - prevalence) * odds,
            }
        })
        .collect()
}

/// Linear-interpolated quantile of sorted data (`numpy.percentile`'s default).
pub fn quantile_sorted(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let h = (sorted.len() - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = h.ceil() as usize;
    Some(sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_counts_ties_half() {
        let y = [true, false, true, false];
        let p = [0.5, 0.5, 0.9, 0.1];
        // pairs: (0.5 vs 0.5) 0.5, (0.5 vs 0.1) 1, (0.9 vs 0.5) 1, (0.9 vs 0.1) 1
        assert_eq!(auroc(&y, &p), Some(3.5 / 4.0));
        assert_eq!(auroc(&[true, true], &[0.1, 0.2]), None);
    }

    #[test]
    fn delong_needs_two_of_each_class_and_is_clipped() {
        assert!(delong(&[true, false, false], &[0.9, 0.1, 0.2], 0.95).is_none());
        let d = delong(&[true, true, false, false], &[0.9, 0.8, 0.1, 0.2], 0.95).unwrap();
        assert_eq!(d.auc, 1.0);
        assert_eq!(d.variance, 0.0);
        // a zero-variance interval is not reported: [1, 1] would pass any floor
        assert_eq!((d.ci_lower, d.ci_upper), (None, None));
        // one swapped pair: a real interval, clipped at 1
        let y = [true, true, true, false, false, false];
        let d = delong(&y, &[0.9, 0.8, 0.3, 0.4, 0.2, 0.1], 0.95).unwrap();
        assert!(d.variance > 0.0);
        let (lo, hi) = (d.ci_lower.unwrap(), d.ci_upper.unwrap());
        assert!(lo < d.auc && hi == 1.0, "{d:?}");
    }

    #[test]
    fn delong_interval_is_undefined_whenever_the_components_are_constant() {
        // AUROC 0 (a perfectly inverted ranking), of more rows
        let y = [true, true, true, false, false, false];
        let d = delong(&y, &[0.1, 0.2, 0.3, 0.7, 0.8, 0.9], 0.95).unwrap();
        assert_eq!((d.auc, d.ci_lower, d.ci_upper), (0.0, None, None));
        // each class tied at its own score, the classes tied with each other
        let d = delong(&y, &[0.4, 0.4, 0.4, 0.4, 0.4, 0.4], 0.95).unwrap();
        assert_eq!((d.auc, d.ci_lower), (0.5, None));
        // perfect separation with scores (0.1 repeated) whose mean rounds: still undefined
        let y: Vec<bool> = (0..30).map(|i| i < 10).collect();
        let p: Vec<f64> = (0..30).map(|i| if i < 10 { 0.7 } else { 0.1 }).collect();
        let d = delong(&y, &p, 0.95).unwrap();
        assert_eq!((d.auc, d.ci_lower, d.ci_upper), (1.0, None, None));
    }

    #[test]
    fn all_equal_scores() {
        let y = [true, false, true, false, false];
        let p = [0.3; 5];
        assert_eq!(auroc(&y, &p), Some(0.5));
        assert_eq!(average_precision(&y, &p), Some(0.4));
        let d = delong(&y, &p, 0.95).unwrap();
        assert_eq!(d.variance, 0.0);
        assert_eq!(roc_curve(&y, &p).len(), 2);
        // Calibration slope is unidentifiable when every score is equal; the intercept is
        // logit(2/5) − logit(0.3).
        let c = calibration(&y, &p, 0.95).unwrap();
        assert!(c.slope.is_none());
        let a = c.intercept.unwrap().value;
        assert!((a - (logit(0.4) - logit(0.3))).abs() < 1e-9, "{a}");
    }

    /// Red-team finding: on perfectly separated scores the slope was reported finite (320,
    /// standard error 1.2e11) where no maximum exists (statsmodels does not converge): a gate
    /// with only a `min` slope passed. Separated, or separated but for ties at the
    /// boundary: no calibration; one pair out of order: a finite fit.
    #[test]
    fn separated_scores_have_no_calibration_slope() {
        let n = 60;
        let y: Vec<bool> = (0..n).map(|i| i >= n / 2).collect();
        let p: Vec<f64> = (0..n)
            .map(|i| 0.05 + 0.9 * (i as f64 + 0.5) / n as f64)
            .collect();
        let no_slope = |y: &[bool], p: &[f64]| {
            let c = calibration(y, p, 0.95).unwrap();
            // The intercept (an offset fit) has a maximum with both classes present.
            assert!(c.intercept.is_some_and(|e| e.value.is_finite()), "{c:?}");
            c.slope.is_none()
        };
        assert!(no_slope(&y, &p));
        // Reversed (every positive below every negative): also no maximum.
        let reversed: Vec<bool> = y.iter().map(|&v| !v).collect();
        assert!(no_slope(&reversed, &p));
        // Quasi-complete: one tie at the boundary.
        let mut tied = p.clone();
        tied[n / 2] = tied[n / 2 - 1];
        assert!(no_slope(&y, &tied));
        // Two rows out of order: the likelihood has a maximum.
        let mut y2 = y.clone();
        y2.swap(n / 2 - 3, n / 2 + 2);
        let c = calibration(&y2, &p, 0.95).unwrap();
        let slope = c.slope.unwrap();
        assert!(slope.value.is_finite() && slope.value > 1.0, "{c:?}");
        assert!(slope.standard_error < 100.0, "{c:?}");
    }

    /// Red-team finding: four rows 1:0.9, 1:0.8, 0:0.1, 0:0.2 are separated, yet the
    /// intercept (statsmodels' GLM with the logit as offset: 0.0, SE 1.41) was reported
    /// undefined with the slope. Its value here comes from that closed form: the offset
    /// fit's score equation Σ (y − σ(a + xᵢ)) = 0 holds at a = 0 by the scores' symmetry.
    #[test]
    fn separated_scores_still_have_a_calibration_intercept() {
        let y = [true, true, false, false];
        let p = [0.9, 0.8, 0.1, 0.2];
        let c = calibration(&y, &p, 0.95).unwrap();
        assert!(c.slope.is_none());
        let a = c.intercept.unwrap();
        assert!(a.value.abs() < 1e-12, "{a:?}");
        // Var(a) = 1 / Σ σ(xᵢ)(1 − σ(xᵢ)) = 1 / (2·0.09 + 2·0.16).
        assert!(
            (a.standard_error - (1.0f64 / 0.5).sqrt()).abs() < 1e-9,
            "{a:?}"
        );
    }

    /// Red-team finding: a score of exactly 0 or 1 that its label contradicts has no finite
    /// intercept (statsmodels does not converge); the clipped logit gave 13.65 (SE 544) or
    /// −13.47. With every score 0 or 1 and none contradicted, the information is nil (SE
    /// 707,130 was reported). Undefined in both cases.
    #[test]
    fn an_intercept_that_only_the_clipping_bounds_is_undefined() {
        for (y, p) in [
            (vec![false, false, true, true], vec![0.0, 0.0, 0.5, 0.7]),
            (vec![false, true, true], vec![1.0, 1.0, 0.5]),
            (vec![false, true], vec![0.0, 1.0]),
        ] {
            let c = calibration(&y, &p, 0.95).unwrap();
            assert!(c.intercept.is_none(), "{y:?} {p:?}: {c:?}");
        }
        // A hard 0 on a negative beside informative scores does not spoil the fit.
        let y = [false, false, true, true, false, true];
        let p = [0.0, 0.3, 0.6, 0.8, 0.4, 0.35];
        assert!(calibration(&y, &p, 0.95).unwrap().intercept.is_some());
    }

    /// Red-team finding: scores of exactly 0 and 1 (a rule or a saturated model) whose
    /// classes overlap: the fit has a maximum (statsmodels converges) but its stopping rule
    /// was never met. With x = ±c (c = logit of the clipped score), 2 of 3 positive at +c
    /// and 1 of 3 at −c, the maximum is at a + b·x = ±ln 2: b = 2 ln 2 / (x₊ − x₋).
    #[test]
    fn hard_zero_one_scores_that_overlap_have_a_calibration_slope() {
        let y = [true, true, false, false, true, false];
        let p = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0];
        let c = calibration(&y, &p, 0.95).unwrap();
        let slope = c.slope.expect("the fit converges");
        // (The clipped logits of 0 and 1 are not exactly opposite in floating point.)
        let expected = 2.0 * 2f64.ln() / (logit(1.0) - logit(0.0));
        assert!(
            (slope.value - expected).abs() < 1e-9,
            "{slope:?} vs {expected}"
        );
        // Hard scores that their labels contradict: no finite intercept.
        assert!(c.intercept.is_none());
    }

    #[test]
    fn thresholds_for_targets() {
        let y = [true, true, true, true, false, false, false, false];
        let p = [0.9, 0.8, 0.7, 0.3, 0.6, 0.2, 0.1, 0.05];
        assert_eq!(threshold_for_sensitivity(&y, &p, 0.75), Some(0.7));
        assert_eq!(threshold_for_sensitivity(&y, &p, 1.0), Some(0.3));
        // specificity 1.0 needs t above 0.6: the smallest score there is 0.7
        assert_eq!(threshold_for_specificity(&y, &p, 1.0), Some(0.7));
        assert_eq!(threshold_for_specificity(&y, &p, 0.75), Some(0.3));
        let c = confusion(&y, &p, 0.7);
        assert_eq!((c.tp, c.fp, c.tn, c.fn_), (3, 0, 4, 1));
    }

    #[test]
    fn wilson_matches_the_closed_form() {
        // 8 of 10: 0.4902 to 0.9433 (Newcombe 1998, table I, method 3); the exact check
        // against statsmodels is in tests/peer/test_validation.py
        let w = wilson(8, 10, 0.95).unwrap();
        assert!((w.ci_lower - 0.4902).abs() < 5e-5, "{w:?}");
        assert!((w.ci_upper - 0.9433).abs() < 5e-5, "{w:?}");
        assert!(wilson(0, 0, 0.95).is_none());
        let zero = wilson(0, 5, 0.95).unwrap();
        assert_eq!(zero.ci_lower, 0.0);
        assert_eq!(wilson(5, 5, 0.95).unwrap().ci_upper, 1.0);
    }

    #[test]
    fn reliability_bins_like_numpy() {
        // 0.3 falls in [0.2, 0.30000000000000004) as numpy.linspace makes the edges
        let r = reliability(&[true, false], &[0.3, 1.0], 10).unwrap();
        assert_eq!(r.bins[2].n, 1);
        assert_eq!(r.bins[9].n, 1);
        assert!((r.ece - (0.5 * 0.7 + 0.5 * 1.0)).abs() < 1e-15);
        // On an edge: the bin below, as scikit-learn 1.9's calibration_curve puts it (0.5 in
        // [0.4, 0.5], 0.1 in [0, 0.1]).
        let r = reliability(&[true, false, true], &[0.5, 0.1, 0.0], 10).unwrap();
        assert_eq!((r.bins[4].n, r.bins[5].n), (1, 0));
        assert_eq!((r.bins[0].n, r.bins[1].n), (2, 0));
    }

    #[test]
    fn decision_curve_treat_all() {
        let y = [true, false, false, false];
        let p = [0.9, 0.6, 0.2, 0.1];
        let d = decision_curve(&y, &p, &[0.5]);
        assert_eq!(d.len(), 1);
        // treated: 0.9 (tp), 0.6 (fp); odds 1
        assert!((d[0].net_benefit - (0.25 - 0.25)).abs() < 1e-15);
        assert!((d[0].treat_all - (0.25 - 0.75)).abs() < 1e-15);
    }

    #[test]
    fn quantiles_interpolate() {
        let s = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(quantile_sorted(&s, 0.0), Some(1.0));
        assert_eq!(quantile_sorted(&s, 0.5), Some(2.5));
        assert_eq!(quantile_sorted(&s, 1.0), Some(4.0));
    }
}
