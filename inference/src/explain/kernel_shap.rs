//! KernelSHAP (Lundberg & Lee, "A Unified Approach to Interpreting Model Predictions",
//! NeurIPS 2017) against a background sample.
//!
//! The value of a coalition `S` of features is the mean over the background rows `b` of
//! `g(f(x_S, b_S̄))`: the row `b` with the features in `S` taken from `x`, scored by the
//! model, through the link `g`: identity, or the logit (so with [`Link::Logit`] the
//! attributions sum to `logit(f(x)) − E_b[logit(f(b))]`, and a linear-logistic model gets
//! exactly `wᵢ·sᵢ·(xᵢ − mean_b bᵢ)`). This is `shap.KernelExplainer` with `link="identity"`
//! on the model's output, or on its logit; note that shap's own `link="logit"` takes the logit
//! of the mean instead (`logit(E_b[f])`), a different game.
//!
//! Features where `x` equals every background row cannot matter and get 0 (as in shap).
//! With `M` varying features, when `2^M − 2` coalitions fit in the sample budget every
//! coalition is evaluated, and the solution is the exact Shapley values of the game;
//! otherwise coalitions are drawn from the Shapley kernel's distribution (a size `s` with
//! probability ∝ `(M−1)/(s·(M−s))`, then `s` features uniformly), each with its complement
//! (paired sampling, Covert & Lee 2021), seeded. The attributions solve the kernel-weighted
//! least squares with `Σφ = g(f(x)) − E_b[g(f(b))]` as a hard constraint.

use nalgebra::{DMatrix, DVector};
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use super::{ExplainError, Explanation, Perturber, logit};

/// The space the scores are averaged and attributed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    Identity,
    /// `ln(p / (1 − p))`, `p` clamped into `[1e-12, 1 − 1e-12]`.
    Logit,
}

impl Link {
    fn apply(self, p: f64) -> f64 {
        match self {
            Link::Identity => p,
            Link::Logit => logit(p),
        }
    }

    /// The name used in requests and responses.
    pub fn as_str(self) -> &'static str {
        match self {
            Link::Identity => "identity",
            Link::Logit => "logit",
        }
    }
}

/// How to explain.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KernelShapOptions {
    /// Most coalitions to evaluate (each costs one forward pass per background row).
    pub samples: usize,
    pub link: Link,
    pub seed: u64,
}

impl KernelShapOptions {
    /// What [`KernelShap::new`] refuses of the options and the background for rows of
    /// `features` values, checked before any forward pass (the prediction included).
    pub fn check(&self, features: usize, background: &[Vec<f32>]) -> Result<(), ExplainError> {
        if background.is_empty() {
            return Err(ExplainError::Invalid(
                "kernel_shap needs a background sample".into(),
            ));
        }
        if let Some(row) = background.iter().find(|r| r.len() != features) {
            return Err(ExplainError::Invalid(format!(
                "kernel_shap: a background row has {} values for {features} features",
                row.len()
            )));
        }
        if self.samples == 0 {
            return Err(ExplainError::Invalid(
                "kernel_shap: samples must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// KernelSHAP of one row.
pub struct KernelShap {
    x: Vec<f32>,
    background: Vec<Vec<f32>>,
    link: Link,
    /// `g(f(x))`.
    fx: f64,
    varying: Vec<usize>,
    /// Coalitions over the varying features, and their weights.
    coalitions: Vec<(Vec<bool>, f64)>,
    /// Whether every coalition was evaluated (exact Shapley values).
    exact: bool,
    handed: usize,
    absorbed: usize,
    /// Per block (0: the background itself; k: coalition k − 1), the sum of `g(score)`.
    sums: Vec<f64>,
}

/// Coalitions with the Shapley kernel's weights: all of them when they fit in `samples`.
fn coalitions(m: usize, samples: usize, seed: u64) -> (Vec<(Vec<bool>, f64)>, bool) {
    if m < 2 {
        return (vec![], true);
    }
    let all = if m < 63 { (1u64 << m) - 2 } else { u64::MAX };
    if all <= samples as u64 {
        let mut out = Vec::with_capacity(all as usize);
        for bits in 1..=all {
            let s = bits.count_ones() as usize;
            let set: Vec<bool> = (0..m).map(|j| bits >> j & 1 == 1).collect();
            out.push((set, kernel_weight(m, s)));
        }
        return (out, true);
    }
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let sizes: Vec<f64> = (1..m)
        .map(|s| (m - 1) as f64 / (s * (m - s)) as f64)
        .collect();
    let total: f64 = sizes.iter().sum();
    let mut out = Vec::with_capacity(samples);
    while out.len() + 2 <= samples.max(2) {
        let mut u = rng.random::<f64>() * total;
        let mut s = m - 1;
        for (i, w) in sizes.iter().enumerate() {
            if u < *w {
                s = i + 1;
                break;
            }
            u -= w;
        }
        let mut set = vec![false; m];
        for j in sample(&mut rng, m, s) {
            set[j] = true;
        }
        let complement = set.iter().map(|b| !b).collect();
        out.push((set, 1.0));
        out.push((complement, 1.0));
    }
    (out, false)
}

/// The Shapley kernel weight of one coalition of `s` of `m` features.
fn kernel_weight(m: usize, s: usize) -> f64 {
    (m - 1) as f64 / (binomial(m, s) * (s * (m - s)) as f64)
}

fn binomial(n: usize, k: usize) -> f64 {
    let k = k.min(n - k);
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

impl KernelShap {
    /// `x`: the row; `background`: rows in the same feature order; `score`: the model's
    /// score of `x` (before the link).
    pub fn new(
        x: Vec<f32>,
        background: Vec<Vec<f32>>,
        score: f64,
        options: KernelShapOptions,
    ) -> Result<Self, ExplainError> {
        options.check(x.len(), &background)?;
        let varying: Vec<usize> = (0..x.len())
            .filter(|&j| background.iter().any(|b| b[j] != x[j]))
            .collect();
        let (coalitions, exact) = coalitions(varying.len(), options.samples, options.seed);
        let blocks = 1 + coalitions.len();
        Ok(KernelShap {
            fx: options.link.apply(score),
            x,
            background,
            link: options.link,
            varying,
            coalitions,
            exact,
            handed: 0,
            absorbed: 0,
            sums: vec![0.0; blocks],
        })
    }

    /// Forward passes `samples` coalitions would take over `background_rows` rows, for
    /// `features` features that all vary (the most it can take).
    pub fn passes(features: usize, background_rows: usize, samples: usize) -> usize {
        let coalitions = if features < 2 {
            0
        } else if features < 63 && (1u64 << features) - 2 <= samples as u64 {
            ((1u64 << features) - 2) as usize
        } else {
            samples.max(2) & !1
        };
        background_rows.saturating_mul(1 + coalitions)
    }

    /// Whether every coalition is evaluated (the values are then exact Shapley values).
    pub fn is_exact(&self) -> bool {
        self.exact
    }

    fn total(&self) -> usize {
        self.background.len() * (1 + self.coalitions.len())
    }
}

impl Perturber for KernelShap {
    fn row_len(&self) -> usize {
        self.x.len()
    }

    fn forward_passes(&self) -> usize {
        self.total()
    }

    fn next_rows(&mut self, rows: usize, out: &mut Vec<f32>) -> usize {
        let n = rows.min(self.total() - self.handed);
        let b_rows = self.background.len();
        for r in self.handed..self.handed + n {
            let (block, b) = (r / b_rows, r % b_rows);
            let start = out.len();
            out.extend_from_slice(&self.background[b]);
            if block > 0 {
                let (set, _) = &self.coalitions[block - 1];
                for (k, &j) in self.varying.iter().enumerate() {
                    if set[k] {
                        out[start + j] = self.x[j];
                    }
                }
            }
        }
        self.handed += n;
        n
    }

    fn absorb(&mut self, scores: &[f64]) {
        let b_rows = self.background.len();
        for &s in scores {
            if self.absorbed >= self.handed {
                break;
            }
            self.sums[self.absorbed / b_rows] += self.link.apply(s);
            self.absorbed += 1;
        }
    }

    fn finish(self: Box<Self>) -> Result<Explanation, ExplainError> {
        let total = self.total();
        if self.absorbed != total {
            return Err(ExplainError::Incomplete {
                absorbed: self.absorbed,
                expected: total,
            });
        }
        let b_rows = self.background.len() as f64;
        let base = self.sums[0] / b_rows;
        let delta = self.fx - base;
        let mut values = vec![0.0; self.x.len()];
        let m = self.varying.len();
        match m {
            0 => {}
            1 => values[self.varying[0]] = delta,
            _ => {
                // Eliminate the last varying feature: φ_last = Δ − Σ_{j<last} φ_j.
                let k = m - 1;
                let rows = self.coalitions.len();
                let mut a = DMatrix::<f64>::zeros(rows, k);
                let mut y = DVector::<f64>::zeros(rows);
                let mut w = DVector::<f64>::zeros(rows);
                for (c, (set, weight)) in self.coalitions.iter().enumerate() {
                    let last = f64::from(u8::from(set[k]));
                    for j in 0..k {
                        a[(c, j)] = f64::from(u8::from(set[j])) - last;
                    }
                    y[c] = self.sums[c + 1] / b_rows - base - last * delta;
                    w[c] = *weight;
                }
                let aw = DMatrix::from_fn(rows, k, |r, c| a[(r, c)] * w[r]);
                let normal = aw.transpose() * &a;
                let rhs = aw.transpose() * &y;
                // A system that does not determine every value (fewer distinct coalitions
                // than features, or coalitions that never separate two of them) has no
                // unique answer: refused, not answered with the least-norm one, which
                // looked valid (the efficiency sum holds) and was arbitrary (a red-team
                // finding: 2 coalitions for 30 features, 200).
                let svd = normal.clone().svd(true, true);
                let largest = svd.singular_values.max();
                let rank = svd.rank(largest * 1e-10);
                if rank < k {
                    return Err(ExplainError::Unsolvable(format!(
                        "the {} sampled coalitions determine {rank} of the {k} unknowns",
                        rows
                    )));
                }
                let phi = match normal.cholesky() {
                    Some(ch) => ch.solve(&rhs),
                    None => svd
                        .solve(&rhs, 1e-12)
                        .map_err(|e| ExplainError::Unsolvable(e.to_owned()))?,
                };
                if phi.iter().any(|v| !v.is_finite()) {
                    return Err(ExplainError::Unsolvable("non-finite attributions".into()));
                }
                for j in 0..k {
                    values[self.varying[j]] = phi[j];
                }
                values[self.varying[k]] = delta - phi.iter().sum::<f64>();
            }
        }
        Ok(Explanation {
            values,
            base_value: Some(base),
            forward_passes: total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::run;
    use super::*;

    /// A nonlinear model of 4 features: σ(x0·x1 − x2² + 0.5·x3).
    fn model(r: &[f32]) -> f64 {
        let r: Vec<f64> = r.iter().map(|&v| f64::from(v)).collect();
        1.0 / (1.0 + (-(r[0] * r[1] - r[2] * r[2] + 0.5 * r[3])).exp())
    }

    fn score(rows: &[f32], n: usize, f: usize) -> Vec<f64> {
        (0..n).map(|i| model(&rows[i * f..(i + 1) * f])).collect()
    }

    /// Shapley values by their definition: the weighted marginal contributions over every
    /// subset (independent of the least-squares code).
    fn brute_force(x: &[f32], background: &[Vec<f32>], link: Link) -> Vec<f64> {
        let m = x.len();
        let value = |set: u32| -> f64 {
            background
                .iter()
                .map(|b| {
                    let row: Vec<f32> = (0..m)
                        .map(|j| if set >> j & 1 == 1 { x[j] } else { b[j] })
                        .collect();
                    link.apply(model(&row))
                })
                .sum::<f64>()
                / background.len() as f64
        };
        let fact = |n: usize| (1..=n).product::<usize>() as f64;
        (0..m)
            .map(|i| {
                (0..1u32 << m)
                    .filter(|s| s >> i & 1 == 0)
                    .map(|s| {
                        let k = s.count_ones() as usize;
                        fact(k) * fact(m - k - 1) / fact(m) * (value(s | 1 << i) - value(s))
                    })
                    .sum()
            })
            .collect()
    }

    fn background() -> Vec<Vec<f32>> {
        vec![
            vec![0.0, 1.0, 0.5, -1.0],
            vec![1.0, -0.5, 0.0, 2.0],
            vec![-0.7, 0.3, 1.2, 0.0],
        ]
    }

    #[test]
    fn every_coalition_gives_the_exact_shapley_values() {
        let x = vec![1.5f32, 0.8, -0.4, 1.0];
        for link in [Link::Identity, Link::Logit] {
            let options = KernelShapOptions {
                samples: 14,
                link,
                seed: 1,
            };
            let method = KernelShap::new(x.clone(), background(), model(&x), options).unwrap();
            assert!(method.is_exact());
            assert_eq!(method.forward_passes(), 3 * 15);
            assert_eq!(KernelShap::passes(4, 3, 14), 3 * 15);
            let e = run(Box::new(method), 4, |rows, n| score(rows, n, 4)).unwrap();
            let want = brute_force(&x, &background(), link);
            for (got, want) in e.values.iter().zip(&want) {
                assert!(
                    (got - want).abs() < 1e-9,
                    "{link:?}: {:?} vs {want:?}",
                    e.values
                );
            }
            let base = e.base_value.unwrap();
            let sum: f64 = e.values.iter().sum();
            assert!((sum - (link.apply(model(&x)) - base)).abs() < 1e-9);
        }
    }

    #[test]
    fn sampled_coalitions_recover_an_additive_game_exactly() {
        // A linear-logistic model explained in logit space is an additive game: any
        // coalitions of full rank give wᵢ·(xᵢ − mean bᵢ) exactly.
        let m = 12;
        let w: Vec<f64> = (0..m).map(|j| (j as f64 - 5.5) / 3.0).collect();
        let lin = |r: &[f32]| -> f64 {
            let z: f64 = r.iter().zip(&w).map(|(&v, w)| f64::from(v) * w).sum();
            1.0 / (1.0 + (-(z - 0.3)).exp())
        };
        let x: Vec<f32> = (0..m).map(|j| ((j * 37) % 11) as f32 / 5.0 - 1.0).collect();
        let background: Vec<Vec<f32>> = (0..5)
            .map(|b| {
                (0..m)
                    .map(|j| ((b * 13 + j * 7) % 9) as f32 / 4.0 - 1.0)
                    .collect()
            })
            .collect();
        let options = KernelShapOptions {
            samples: 200,
            link: Link::Logit,
            seed: 9,
        };
        let method = KernelShap::new(x.clone(), background.clone(), lin(&x), options).unwrap();
        assert!(!method.is_exact());
        assert_eq!(method.forward_passes(), 5 * 201);
        let e = run(Box::new(method), 64, |rows, n| {
            (0..n).map(|i| lin(&rows[i * m..(i + 1) * m])).collect()
        })
        .unwrap();
        for j in 0..m {
            let mean = background.iter().map(|b| f64::from(b[j])).sum::<f64>() / 5.0;
            let want = w[j] * (f64::from(x[j]) - mean);
            assert!(
                (e.values[j] - want).abs() < 1e-6,
                "{j}: {} vs {want}",
                e.values[j]
            );
        }
    }

    /// Red-team finding: 2 coalitions for 30 features gave 200 and arbitrary values (the
    /// least-norm solution; the efficiency sum still held). Too few coalitions to determine
    /// every value are refused, naming what to do.
    #[test]
    fn too_few_coalitions_for_the_features_are_refused() {
        let m = 12;
        let lin = |r: &[f32]| -> f64 {
            let z: f64 = r
                .iter()
                .enumerate()
                .map(|(j, &v)| f64::from(v) * j as f64)
                .sum();
            1.0 / (1.0 + (-z / 10.0).exp())
        };
        let x: Vec<f32> = (0..m).map(|j| j as f32 / 5.0).collect();
        let background = vec![vec![0.0f32; m]];
        for samples in [1, 2, 6] {
            let options = KernelShapOptions {
                samples,
                link: Link::Logit,
                seed: 3,
            };
            let method = KernelShap::new(x.clone(), background.clone(), lin(&x), options).unwrap();
            let e = run(Box::new(method), 64, |rows, n| {
                (0..n).map(|i| lin(&rows[i * m..(i + 1) * m])).collect()
            })
            .unwrap_err();
            assert!(matches!(e, ExplainError::Unsolvable(_)), "{samples}: {e}");
            assert!(e.to_string().contains("ask for more samples"), "{e}");
        }
    }

    #[test]
    fn features_that_never_vary_get_nothing() {
        let x = vec![1.0f32, 0.3, 2.0, -1.0];
        let background = vec![vec![0.0, 0.3, 1.0, -1.0], vec![2.0, 0.3, 0.0, -1.0]];
        let options = KernelShapOptions {
            samples: 100,
            link: Link::Identity,
            seed: 0,
        };
        let m = KernelShap::new(x.clone(), background.clone(), model(&x), options).unwrap();
        // Two varying features: two coalitions ({0}, {2}).
        assert_eq!(m.forward_passes(), 2 * 3);
        let e = run(Box::new(m), 8, |rows, n| score(rows, n, 4)).unwrap();
        assert_eq!(e.values[1], 0.0);
        assert_eq!(e.values[3], 0.0);
        let want = brute_force(&x, &background, Link::Identity);
        for (g, w) in e.values.iter().zip(&want) {
            assert!((g - w).abs() < 1e-9);
        }
    }

    #[test]
    fn bad_inputs_are_refused() {
        let o = KernelShapOptions {
            samples: 10,
            link: Link::Identity,
            seed: 0,
        };
        assert!(KernelShap::new(vec![1.0], vec![], 0.5, o).is_err());
        assert!(KernelShap::new(vec![1.0, 2.0], vec![vec![1.0]], 0.5, o).is_err());
        let o = KernelShapOptions { samples: 0, ..o };
        assert!(KernelShap::new(vec![1.0], vec![vec![0.0]], 0.5, o).is_err());
    }
}
