//! Multi-class metrics (one output with K class probabilities, one true class per row):
//! one-vs-rest per class and their macro averages, accuracy, the K × K confusion matrix and
//! the multi-class Brier score, with the definitions scikit-learn uses.

use serde::Serialize;

use crate::bootstrap::{self, BootstrapSpec};
use crate::metrics;
use crate::report::{CLUSTERED_ROWS_MULTICLASS, Metric};

/// One class against the rest.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassMetrics {
    pub label: String,
    /// Rows whose true class this is.
    pub n: usize,
    /// AUROC of this class's probability, this class vs the rest (DeLong CI).
    pub auroc: Metric,
    /// Average precision, this class vs the rest.
    pub auprc: Metric,
    /// Recall of the predicted class (argmax), Wilson CI.
    pub sensitivity: Metric,
    /// Precision of the predicted class (argmax), Wilson CI.
    pub ppv: Metric,
    pub f1: Metric,
    /// With `--patient-id-column`: the patients with a row of this class, and with a row of
    /// another class (the deployment gate's minimum-sample rule counts these, not rows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patients: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patients_outside: Option<usize>,
}

/// The multi-class section of a report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MulticlassMetrics {
    pub n: usize,
    /// With `--patient-id-column`: the distinct patients behind the rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patients: Option<usize>,
    pub labels: Vec<String>,
    /// Mean one-vs-rest AUROC over the classes with both outcomes present
    /// (`roc_auc_score(multi_class="ovr", average="macro")`); bootstrap CI.
    pub auroc: Metric,
    /// Mean one-vs-rest average precision over the classes present.
    pub auprc: Metric,
    /// Top-1 accuracy (argmax; ties go to the lower index), Wilson CI.
    pub accuracy: Metric,
    /// Mean recall over the classes present (`recall_score(average="macro")`).
    pub macro_sensitivity: Metric,
    /// Mean F1 over the classes present (`f1_score(average="macro")`).
    pub macro_f1: Metric,
    /// Mean over rows of Σₖ (pₖ − yₖ)² (Brier 1950).
    pub brier: Metric,
    pub classes: Vec<ClassMetrics>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
}

fn argmax(row: &[f64]) -> usize {
    let mut best = 0;
    for (k, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = k;
        }
    }
    best
}

fn mean_of(values: &[f64], n: usize, why: &str) -> Metric {
    let mean = (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64);
    Metric::point(mean, n, why)
}

/// `y[i]` is row i's class index (< `labels.len()`); `p` holds the K probabilities of each
/// row, row after row. `clusters` (`clusters.0[i]` is row i's patient, of `clusters.1`):
/// rows clustered by patient; the macro AUROC's bootstrap resamples whole patients, the
/// patients of each class are counted, and every interval that takes rows as independent
/// (DeLong, Wilson) is dropped with [`CLUSTERED_ROWS_MULTICLASS`].
pub fn evaluate(
    y: &[usize],
    p: &[f64],
    labels: &[String],
    confidence: f64,
    bootstrap: Option<BootstrapSpec>,
    clusters: Option<(&[usize], usize)>,
) -> MulticlassMetrics {
    let k = labels.len();
    let n = y.len();
    let rows: Vec<&[f64]> = p.chunks(k.max(1)).take(n).collect();
    let predicted: Vec<usize> = rows.iter().map(|r| argmax(r)).collect();
    let mut confusion = vec![vec![0usize; k]; k];
    for (&t, &q) in y.iter().zip(&predicted) {
        confusion[t][q] += 1;
    }
    let mut classes = Vec::with_capacity(k);
    let mut columns = Vec::with_capacity(k);
    let (mut aucs, mut aps, mut recalls, mut f1s) = (vec![], vec![], vec![], vec![]);
    for (c, label) in labels.iter().enumerate() {
        let yc: Vec<bool> = y.iter().map(|&t| t == c).collect();
        let pc: Vec<f64> = rows.iter().map(|r| r[c]).collect();
        let in_class = yc.iter().filter(|&&v| v).count();
        let auroc = Metric::auroc(&yc, &pc, confidence, "the class is absent or is every row");
        if let Some(v) = auroc.value {
            aucs.push(v);
        }
        let ap = metrics::average_precision(&yc, &pc);
        let tp = confusion[c][c];
        let called = (0..k).map(|t| confusion[t][c]).sum::<usize>();
        let f1 = (in_class + called > 0).then(|| 2.0 * tp as f64 / (in_class + called) as f64);
        if in_class > 0 {
            if let Some(v) = ap {
                aps.push(v);
            }
            recalls.push(tp as f64 / in_class as f64);
            f1s.push(f1.unwrap_or(0.0));
        }
        classes.push(ClassMetrics {
            label: label.clone(),
            n: in_class,
            auroc,
            auprc: Metric::point(ap, n, "the class is absent"),
            sensitivity: Metric::proportion(
                metrics::wilson(tp, in_class, confidence),
                "the class is absent",
            ),
            ppv: Metric::proportion(
                metrics::wilson(tp, called, confidence),
                "the class is never predicted",
            ),
            f1: Metric::point(f1, n, "the class is absent and never predicted"),
            patients: None,
            patients_outside: None,
        });
        columns.push((yc, pc));
    }
    let mut auroc = mean_of(&aucs, n, "no class has both outcomes");
    if let (Some(spec), Some(_)) = (bootstrap, auroc.value)
        && let Some(ci) = bootstrap::bootstrap_macro_auroc(&columns, clusters, spec)
    {
        auroc.set_bootstrap_interval(ci);
    }
    let correct = y.iter().zip(&predicted).filter(|(a, b)| a == b).count();
    let accuracy = Metric::proportion(metrics::wilson(correct, n, confidence), "no rows");
    let brier: Vec<f64> = rows
        .iter()
        .zip(y)
        .map(|(r, &t)| {
            r.iter()
                .enumerate()
                .map(|(c, v)| (v - f64::from(u8::from(c == t))).powi(2))
                .sum()
        })
        .collect();
    let mut m = MulticlassMetrics {
        n,
        patients: None,
        labels: labels.to_vec(),
        auroc,
        auprc: mean_of(&aps, n, "no class is present"),
        accuracy,
        macro_sensitivity: mean_of(&recalls, n, "no class is present"),
        macro_f1: mean_of(&f1s, n, "no class is present"),
        brier: mean_of(&brier, n, "no rows"),
        classes,
        confusion,
    };
    if let Some((of, _)) = clusters {
        m.clustered(y, of);
    }
    m
}

impl MulticlassMetrics {
    /// Rows clustered by patient: counts the patients, of every class and outside it, and
    /// drops the row-level intervals (the macro AUROC's bootstrap is the cluster one).
    fn clustered(&mut self, y: &[usize], of: &[usize]) {
        let k = self.labels.len();
        // The classes each patient of these rows has a row of (only the patients present:
        // a subgroup's evaluation allocated a table of every patient of the dataset, a
        // red-team finding on 300,000 patients and 500 subgroups).
        let mut seen: std::collections::HashMap<usize, Vec<bool>> =
            std::collections::HashMap::new();
        for (&t, &c) in y.iter().zip(of) {
            seen.entry(c).or_insert_with(|| vec![false; k])[t] = true;
        }
        let with_rows: Vec<&Vec<bool>> = seen.values().collect();
        self.patients = Some(with_rows.len());
        for (c, class) in self.classes.iter_mut().enumerate() {
            class.patients = Some(with_rows.iter().filter(|s| s[c]).count());
            class.patients_outside = Some(
                with_rows
                    .iter()
                    .filter(|s| s.iter().enumerate().any(|(t, &b)| b && t != c))
                    .count(),
            );
            for m in [
                &mut class.auroc,
                &mut class.auprc,
                &mut class.sensitivity,
                &mut class.ppv,
                &mut class.f1,
            ] {
                m.without_row_interval(CLUSTERED_ROWS_MULTICLASS);
            }
        }
        for m in [
            &mut self.auroc,
            &mut self.auprc,
            &mut self.accuracy,
            &mut self.macro_sensitivity,
            &mut self.macro_f1,
            &mut self.brier,
        ] {
            m.without_row_interval(CLUSTERED_ROWS_MULTICLASS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_classes_by_hand() {
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| (*s).to_owned()).collect();
        let y = [0, 1, 2, 0, 1];
        #[rustfmt::skip]
        let p = [
            0.7, 0.2, 0.1,
            0.2, 0.5, 0.3,
            0.1, 0.6, 0.3,
            0.4, 0.4, 0.2,
            0.3, 0.3, 0.4,
        ];
        let m = evaluate(&y, &p, &labels, 0.95, None, None);
        // argmax: 0, 1, 1, 0 (tie → lower index), 2
        assert_eq!(
            m.confusion,
            vec![vec![2, 0, 0], vec![0, 1, 1], vec![0, 1, 0]]
        );
        assert_eq!(m.accuracy.value, Some(3.0 / 5.0));
        assert_eq!(m.classes[0].auroc.value, Some(1.0));
        // class c: one positive (0.3) vs 0.1, 0.3, 0.2, 0.4 → (1 + 0.5 + 1 + 0) / 4
        assert_eq!(m.classes[2].auroc.value, Some(0.625));
        // recall: a 2/2, b 1/2, c 0/1
        assert!((m.macro_sensitivity.value.unwrap() - 0.5).abs() < 1e-15);
        // Σₖ (pₖ − yₖ)² per row: 0.14, 0.38, 0.86, 0.56, 0.74 → mean 0.536
        assert!(
            (m.brier.value.unwrap() - 0.536).abs() < 1e-12,
            "{:?}",
            m.brier
        );
    }

    #[test]
    fn an_absent_class_is_left_out_of_the_macro_mean() {
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| (*s).to_owned()).collect();
        let y = [0, 1, 0, 1];
        let p = [0.8, 0.1, 0.1, 0.3, 0.6, 0.1, 0.6, 0.3, 0.1, 0.2, 0.7, 0.1];
        let m = evaluate(&y, &p, &labels, 0.95, None, None);
        assert!(m.classes[2].auroc.undefined.is_some());
        assert_eq!(m.auroc.value, Some(1.0));
        assert_eq!(m.classes[2].n, 0);
    }
}
