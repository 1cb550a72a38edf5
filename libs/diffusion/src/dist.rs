//! Per-position token distributions: temperature, top-k and nucleus (top-p) filtering,
//! and categorical draws, all on the host in O(vocab) per position.
//!
//! Draws use one uniform number per token (inverse CDF), so a position costs one random
//! number rather than a Gumbel sample for every vocabulary entry.

use bd3lm_model::host::exp;
use bd3lm_sampling::Filter;
use rand::Rng;

/// A filtered distribution over the vocabulary for one position.
#[derive(Debug, Clone)]
pub struct TokenDist {
    /// Unnormalised probabilities after filtering (0 for excluded tokens).
    weights: Vec<f32>,
    /// Sum of `weights`.
    total: f64,
    /// Most likely token and its probability before filtering.
    top: (u32, f32),
}

impl TokenDist {
    /// The distribution of `logits` with `excluded` (the mask id) removed, scaled by the
    /// filter's temperature and filtered by its top-k and top-p.
    pub fn new(logits: &[f32], excluded: u32, filter: &Filter) -> Self {
        let inv_t = (1.0 / filter.temperature) as f32;
        let allowed = |i: usize| i as u32 != excluded;
        let cut = (excluded as usize).min(logits.len());
        let (before, after) = (&logits[..cut], logits.get(cut + 1..).unwrap_or(&[]));
        let max = max(before).max(max(after)) * inv_t;
        let top = (0..logits.len())
            .find(|&i| allowed(i) && logits[i] * inv_t == max)
            .unwrap_or(0) as u32;
        // One branch-free loop (it vectorises); the excluded token is zeroed after it.
        let mut weights: Vec<f32> = logits.iter().map(|&l| exp(l * inv_t - max)).collect();
        if let Some(w) = weights.get_mut(excluded as usize) {
            *w = 0.0;
        }
        let mut total = sum(&weights);
        let top_prob = (1.0 / total) as f32;
        if let Some(k) = filter.top_k.filter(|&k| k < weights.len()) {
            keep_largest(&mut weights, |ranked, _| ranked >= k);
            total = sum(&weights);
        }
        if filter.top_p < 1.0 {
            let target = filter.top_p * total;
            keep_largest(&mut weights, |_, mass| mass >= target);
            total = sum(&weights);
        }
        Self {
            weights,
            total,
            top: (top, top_prob),
        }
    }

    /// The most likely token (lowest id among ties) and its probability before filtering.
    pub fn top(&self) -> (u32, f32) {
        self.top
    }

    /// Probability of `token` after filtering.
    pub fn prob(&self, token: u32) -> f64 {
        self.weights
            .get(token as usize)
            .map_or(0.0, |&w| w as f64 / self.total)
    }

    /// Draws a token: greedy takes the most likely one, else one uniform number picks a
    /// token by inverse CDF.
    pub fn draw(&self, rng: &mut impl Rng, greedy: bool) -> u32 {
        if greedy {
            return self.top.0;
        }
        let u = rng.random::<f64>() * self.total;
        let mut acc = 0.0;
        let mut last = self.top.0;
        for (i, &w) in self.weights.iter().enumerate() {
            if w > 0.0 {
                acc += w as f64;
                last = i as u32;
                if acc > u {
                    return last;
                }
            }
        }
        last
    }
}

/// The largest of `values` (-inf for none), in eight lanes so that it vectorises.
fn max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for l in 0..8 {
            lanes[l] = lanes[l].max(c[l]);
        }
    }
    lanes.iter().fold(tail, |m, &v| m.max(v))
}

/// The sum of `weights` in f64, in four lanes so that it vectorises.
fn sum(weights: &[f32]) -> f64 {
    let mut lanes = [0f64; 4];
    let chunks = weights.chunks_exact(4);
    let tail: f64 = chunks.remainder().iter().map(|&w| w as f64).sum();
    for c in chunks {
        for l in 0..4 {
            lanes[l] += c[l] as f64;
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// Bits dropped from a weight's to name its histogram bucket: 32 buckets per octave.
const BUCKET_SHIFT: u32 = 18;

/// The histogram bucket of a non-negative weight. A positive float's bits grow with its
/// value, so buckets are ranges of weights in order.
fn bucket(w: f32) -> usize {
    (w.to_bits() >> BUCKET_SHIFT) as usize
}

/// Zeroes every weight outside the smallest prefix of the ranking (weight descending, id
/// ascending) for which `done(count, mass)` holds, `count` and `mass` being the size and
/// weight of the prefix. Expected O(n): a histogram of the weights finds the bucket where
/// the prefix ends, and quickselect finds the end inside it.
fn keep_largest(weights: &mut [f32], done: impl Fn(usize, f64) -> bool) {
    let buckets = bucket(f32::MAX) + 1;
    let (mut counts, mut masses) = (vec![0usize; buckets], vec![0f64; buckets]);
    for &w in weights.iter().filter(|&&w| w > 0.0) {
        counts[bucket(w)] += 1;
        masses[bucket(w)] += w as f64;
    }
    let (mut count, mut mass) = (0, 0f64);
    let Some(edge) = (0..buckets).rev().find(|&b| {
        let ends = counts[b] > 0 && done(count + counts[b], mass + masses[b]);
        if !ends {
            count += counts[b];
            mass += masses[b];
        }
        ends
    }) else {
        return; // Every weight is needed.
    };
    let mut inside: Vec<(f32, u32)> = weights
        .iter()
        .enumerate()
        .filter(|&(_, &w)| w > 0.0 && bucket(w) == edge)
        .map(|(i, &w)| (w, i as u32))
        .collect();
    let kept = prefix(&mut inside, count, mass, done);
    for w in weights.iter_mut().filter(|w| bucket(**w) < edge) {
        *w = 0.0;
    }
    for &(_, i) in &inside[kept..] {
        weights[i as usize] = 0.0;
    }
}

/// Reorders `ranked` so that it starts with the fewest of its items, first in the ranking,
/// that make `done` hold after a prefix of `before` items of weight `mass`, and returns
/// how many those are (all when `done` never holds).
fn prefix(
    ranked: &mut [(f32, u32)],
    before: usize,
    mut mass: f64,
    done: impl Fn(usize, f64) -> bool,
) -> usize {
    let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    // Invariant: ranked[..lo] (of weight `mass` with what came before) precede everything
    // after them and do not satisfy `done`; the end lies in ranked[lo..hi].
    let (mut lo, mut hi) = (0, ranked.len());
    loop {
        if hi - lo <= 64 {
            ranked[lo..hi].sort_unstable_by(order);
            while lo < hi && !done(before + lo, mass) {
                mass += ranked[lo].0 as f64;
                lo += 1;
            }
            return lo;
        }
        let mid = (hi - lo) / 2;
        ranked[lo..hi].select_nth_unstable_by(mid, order);
        let upper: f64 = ranked[lo..=lo + mid].iter().map(|x| x.0 as f64).sum();
        if done(before + lo + mid + 1, mass + upper) {
            hi = lo + mid + 1;
        } else {
            mass += upper;
            lo += mid + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn random_logits(n: usize, seed: u64, spread: f32) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>() * spread).collect()
    }

    /// The reference rule written naively: sort descending (ties by id), take tokens until
    /// the mass reaches p.
    fn naive_nucleus(probs: &[f64], p: f64) -> Vec<u32> {
        let mut idx: Vec<u32> = (0..probs.len() as u32)
            .filter(|&i| probs[i as usize] > 0.0)
            .collect();
        idx.sort_by(|&a, &b| {
            probs[b as usize]
                .total_cmp(&probs[a as usize])
                .then(a.cmp(&b))
        });
        let mut mass = 0.0;
        let mut out = Vec::new();
        for i in idx {
            if mass >= p {
                break;
            }
            mass += probs[i as usize];
            out.push(i);
        }
        out.sort();
        out
    }

    #[test]
    fn top_p_keeps_exactly_the_smallest_set_reaching_p() {
        for (seed, n, spread) in [
            (1, 50, 5.0),
            (2, 5000, 12.0),
            (3, 50258, 3.0),
            (4, 300, 0.0),
        ] {
            let logits = random_logits(n, seed, spread);
            let full = TokenDist::new(&logits, u32::MAX, &Filter::default());
            let probs: Vec<f64> = (0..n as u32).map(|i| full.prob(i)).collect();
            for p in [0.1, 0.5, 0.9, 0.999] {
                let dist = TokenDist::new(
                    &logits,
                    u32::MAX,
                    &Filter {
                        top_p: p,
                        ..Filter::default()
                    },
                );
                let kept: Vec<u32> = (0..n as u32).filter(|&i| dist.prob(i) > 0.0).collect();
                let expected = naive_nucleus(&probs, p * probs.iter().sum::<f64>());
                assert_eq!(kept, expected, "seed {seed} p {p}");
                let mass: f64 = kept.iter().map(|&i| probs[i as usize]).sum();
                assert!(mass >= p - 1e-6);
            }
            for k in [1, 7, n / 2] {
                let top_k = Filter {
                    top_k: Some(k),
                    ..Filter::default()
                };
                let dist = TokenDist::new(&logits, u32::MAX, &top_k);
                let kept: Vec<u32> = (0..n as u32).filter(|&i| dist.prob(i) > 0.0).collect();
                let mut expected = naive_nucleus(&probs, 2.0);
                expected.sort_by(|&a, &b| {
                    probs[b as usize]
                        .total_cmp(&probs[a as usize])
                        .then(a.cmp(&b))
                });
                expected.truncate(k);
                expected.sort();
                assert_eq!(kept, expected, "seed {seed} k {k}");
            }
        }
    }

    #[test]
    fn top_k_keeps_the_k_most_likely_and_excludes_the_mask() {
        let logits = vec![0.1, 3.0, 2.0, 5.0, 2.0, -1.0];
        let dist = TokenDist::new(
            &logits,
            3,
            &Filter {
                top_k: Some(2),
                ..Filter::default()
            },
        );
        let kept: Vec<u32> = (0..6).filter(|&i| dist.prob(i) > 0.0).collect();
        assert_eq!(kept, [1, 2], "ties broken towards the lower id");
        assert_eq!(dist.top().0, 1);
        assert!((dist.prob(1) + dist.prob(2) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let logits = vec![1.0, 2.0, 3.0];
        let cold = TokenDist::new(
            &logits,
            u32::MAX,
            &Filter {
                temperature: 0.1,
                ..Filter::default()
            },
        );
        let hot = TokenDist::new(
            &logits,
            u32::MAX,
            &Filter {
                temperature: 10.0,
                ..Filter::default()
            },
        );
        assert!(cold.prob(2) > 0.99);
        assert!(hot.prob(2) < 0.4 && hot.prob(0) > 0.3);
    }

    /// Draw frequencies match the probabilities within 5 standard errors.
    #[test]
    fn empirical_distribution_matches_the_model() {
        let logits = vec![0.0, 1.0, 2.0, -0.5, 1.5];
        let dist = TokenDist::new(&logits, u32::MAX, &Filter::default());
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let n = 200_000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            counts[dist.draw(&mut rng, false) as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let p = dist.prob(i as u32);
            let se = (p * (1.0 - p) / n as f64).sqrt();
            assert!(
                (c as f64 / n as f64 - p).abs() < 5.0 * se,
                "token {i}: {c} vs {p}"
            );
        }
        assert_eq!(dist.draw(&mut rng, true), 2);
    }
}
