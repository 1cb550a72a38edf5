//! Per-position token distributions: temperature, top-k and nucleus (top-p) filtering,
//! and categorical draws, all on the host in O(vocab) per position.
//!
//! Draws use one uniform number per token (inverse CDF), so a position costs one random
//! number rather than a Gumbel sample for every vocabulary entry. A nucleus is not built
//! before the draw: a token drawn from the distribution before it is kept when the mass
//! ranked above it is under top-p (rejection sampling, exact), which a sampler asking for
//! one token of a position decides in one pass instead of ranking the vocabulary.

use bd3lm_model::host::{exp, max};
use bd3lm_sampling::Filter;
use rand::Rng;

/// Weights are summed in chunks of this many: a draw finds its chunk among the sums and
/// reads only that chunk's weights.
const CHUNK: usize = 64;

/// How many tokens a nucleus draw tries before it builds the nucleus. A try is kept with
/// the nucleus's share of the mass, at least top-p, so with top-p 0.5 or more at most one
/// draw in 256 builds it.
const TRIES: usize = 8;

/// A filtered distribution over the vocabulary for one position.
#[derive(Debug, Clone)]
pub struct TokenDist {
    /// The distribution before the nucleus: temperature and top-k applied, the excluded
    /// token at 0.
    cdf: Cdf,
    /// The mass the nucleus reaches (top-p of `cdf`'s), when the filter asks for one.
    nucleus: Option<f64>,
    /// Most likely token and its probability before filtering.
    top: (u32, f32),
}

impl TokenDist {
    /// The distribution of `logits` with `excluded` (the mask id) removed, scaled by the
    /// filter's temperature and filtered by its top-k and top-p.
    pub fn new(logits: &[f32], excluded: u32, filter: &Filter) -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { Self::new_avx2(logits, excluded, filter) };
        }
        Self::build(logits, excluded, filter)
    }

    /// [`TokenDist::new`] with its loops eight lanes wide. The lanes of every sum are
    /// fixed in the code, so the bits are those of the narrower build.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn new_avx2(logits: &[f32], excluded: u32, filter: &Filter) -> Self {
        Self::build(logits, excluded, filter)
    }

    /// [`TokenDist::new`] in the lanes of the build's target (inlined into each caller).
    #[inline(always)]
    fn build(logits: &[f32], excluded: u32, filter: &Filter) -> Self {
        let inv_t = (1.0 / filter.temperature) as f32;
        let allowed = |i: usize| i as u32 != excluded;
        let cut = (excluded as usize).min(logits.len());
        let (before, after) = (&logits[..cut], logits.get(cut + 1..).unwrap_or(&[]));
        let max = max(before).max(max(after)) * inv_t;
        // The first such token, looked for only in chunks that hold one.
        let is_top = |l: f32| l * inv_t == max;
        let top = logits
            .chunks(64)
            .enumerate()
            .filter(|(_, chunk)| any(chunk, is_top))
            .find_map(|(n, chunk)| {
                (n * 64..)
                    .zip(chunk)
                    .find(|&(i, &l)| allowed(i) && is_top(l))
            })
            .map_or(0, |(i, _)| i as u32);
        // One branch-free loop (it vectorises); the excluded token is zeroed after it.
        let mut weights = vec![0f32; logits.len()];
        for (w, &l) in weights.iter_mut().zip(logits) {
            *w = exp(l * inv_t - max);
        }
        if let Some(w) = weights.get_mut(excluded as usize) {
            *w = 0.0;
        }
        let mut cdf = Cdf::new(weights);
        let top_prob = (1.0 / cdf.total) as f32;
        if let Some(k) = filter.top_k.filter(|&k| k < cdf.weights.len()) {
            let mut weights = cdf.weights;
            keep_largest(&mut weights, cdf.total, |ranked, _| ranked >= k);
            cdf = Cdf::new(weights);
        }
        Self {
            nucleus: (filter.top_p < 1.0).then_some(filter.top_p * cdf.total),
            cdf,
            top: (top, top_prob),
        }
    }

    /// The most likely token (lowest id among ties) and its probability before filtering.
    pub fn top(&self) -> (u32, f32) {
        self.top
    }

    /// Draws a token: greedy takes the most likely one, else one uniform number picks a
    /// token by inverse CDF, tried against the nucleus when there is one. Weights without
    /// mass (every token excluded, or logits not finite) give the most likely token.
    pub fn draw(&self, rng: &mut impl Rng, greedy: bool) -> u32 {
        let drawn = if greedy { None } else { self.sample(rng) };
        drawn.unwrap_or(self.top.0)
    }

    /// A token drawn after every filter; `None` when the weights hold no mass.
    fn sample(&self, rng: &mut impl Rng) -> Option<u32> {
        let Some(target) = self.nucleus else {
            return self.cdf.draw(rng);
        };
        for _ in 0..TRIES {
            let token = self.cdf.draw(rng)?;
            if self.keeps(token, target) {
                return Some(token);
            }
        }
        // Each try is kept with the same distribution, the nucleus's, and so is this.
        self.filtered().draw(rng)
    }

    /// Whether `token` is in the nucleus reaching `target`: the smallest prefix of the
    /// ranking (weight descending, id ascending) whose mass reaches it.
    fn keeps(&self, token: u32, target: f64) -> bool {
        self.cdf.mass_before(token) < target
    }

    /// The distribution after every filter, the nucleus built by ranking.
    fn filtered(&self) -> Cdf {
        let mut weights = self.cdf.weights.clone();
        if let Some(target) = self.nucleus {
            keep_largest(&mut weights, self.cdf.total, |_, mass| mass >= target);
        }
        Cdf::new(weights)
    }
}

/// Unnormalised weights with their sums by chunk, for draws by inverse CDF.
#[derive(Debug, Clone)]
struct Cdf {
    weights: Vec<f32>,
    /// The sum of each [`CHUNK`] of `weights`.
    chunks: Vec<f64>,
    /// The sum of `chunks`, added in order as a draw adds them.
    total: f64,
}

impl Cdf {
    #[inline(always)]
    fn new(weights: Vec<f32>) -> Self {
        // A loop rather than an iterator chain, so that the sums are inlined into (and
        // vectorised as) the caller.
        let mut chunks = Vec::with_capacity(weights.len().div_ceil(CHUNK));
        for chunk in weights.chunks(CHUNK) {
            chunks.push(sum(chunk));
        }
        Self {
            total: chunks.iter().fold(0.0, |acc, &s| acc + s),
            chunks,
            weights,
        }
    }

    /// A token, with probability its weight over the total; `None` when the total is not
    /// positive and finite.
    fn draw(&self, rng: &mut impl Rng) -> Option<u32> {
        let u = rng.random::<f64>() * self.total;
        // The chunk where the running sum passes u: one exists when the total is positive,
        // since the last chunk with weight brings the sum to it, which is above u.
        let mut acc = 0.0;
        let chunk = self.chunks.iter().position(|&s| {
            let passes = s > 0.0 && acc + s > u;
            acc += if passes { 0.0 } else { s };
            passes
        })?;
        // Inside it the weights are added one by one, which may round below the chunk's
        // sum: then the last weight of the chunk is the token.
        let start = chunk * CHUNK;
        let mut last = start;
        for (i, &w) in (start..).zip(&self.weights[start..]).take(CHUNK) {
            if w > 0.0 {
                acc += w as f64;
                last = i;
                if acc > u {
                    break;
                }
            }
        }
        Some(last as u32)
    }

    /// The weight ranked before `token` (weight descending, id ascending).
    fn mass_before(&self, token: u32) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { self.mass_before_avx2(token) };
        }
        self.mass_before_lanes(token)
    }

    /// [`Cdf::mass_before`] eight lanes wide, with the bits of the narrower build.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn mass_before_avx2(&self, token: u32) -> f64 {
        self.mass_before_lanes(token)
    }

    /// [`Cdf::mass_before`] in one pass, in the lanes of the build's target: ties rank by
    /// id.
    #[inline(always)]
    fn mass_before_lanes(&self, token: u32) -> f64 {
        let (before, after) = self.weights.split_at(token as usize);
        let w = after[0];
        selected(before, |v| v >= w).1 + selected(&after[1..], |v| v > w).1
    }
}

/// Whether `test` holds for any of `values`, tested without a branch so that it
/// vectorises.
#[inline(always)]
fn any(values: &[f32], test: impl Fn(f32) -> bool) -> bool {
    values.iter().fold(false, |hit, &v| hit | test(v))
}

/// The sum of `weights` in f64, in four lanes so that it vectorises.
#[inline(always)]
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

/// Zeroes every weight outside the smallest prefix of the ranking (weight descending, id
/// ascending) for which `done(count, mass)` holds, `count` and `mass` being the size and
/// weight of the prefix; `done` must hold for every prefix longer than one it holds for.
/// `total` is the sum of the weights.
///
/// Expected O(n) in a few passes that vectorise: a sorted sample of the weights guesses
/// where the prefix ends, passes over the weights widen a bracket of two thresholds
/// around the guess until it holds the end and then halve it while it holds many, and
/// only the weights inside the bracket, a few hundred, are ranked.
#[inline(always)]
fn keep_largest(weights: &mut [f32], total: f64, done: impl Fn(usize, f64) -> bool) {
    let sample = Sample::of(weights, total);
    let Some(end) = sample.find_end(weights, &done) else {
        return; // Every weight is needed.
    };
    let (upper, lower) = (sample.threshold(end.hi), sample.threshold(end.lo));
    let mut inside: Vec<(f32, u32)> = Vec::with_capacity(end.inside);
    for (n, chunk) in weights.chunks_mut(16).enumerate() {
        let within = |w: f32| w > lower && w <= upper;
        if any(chunk, within) {
            let found = (n * 16..).zip(chunk.iter()).filter(|&(_, &w)| within(w));
            inside.extend(found.map(|(i, &w)| (w, i as u32)));
        }
        for w in chunk {
            *w = if *w > upper { *w } else { 0.0 };
        }
    }
    let kept = prefix(&mut inside, end.before.0, end.before.1, done);
    for &(w, i) in &inside[..kept] {
        weights[i as usize] = w;
    }
}

/// Two thresholds of a [`Sample`] between which the smallest prefix ends.
struct End {
    /// The indices of the upper and the lower threshold.
    hi: usize,
    lo: usize,
    /// The count and mass of the weights above the upper one (they are kept).
    before: (usize, f64),
    /// How many weights lie between the two.
    inside: usize,
}

/// Every `stride`-th positive weight, largest first, as thresholds between +inf (index 0)
/// and 0 (the last index).
struct Sample {
    values: Vec<f32>,
    /// How many weights, and how much weight, the sample's stands for.
    count_scale: f64,
    mass_scale: f64,
}

impl Sample {
    /// About 1024 of `weights` (of sum `total`) spread over the vocabulary.
    #[inline(always)]
    fn of(weights: &[f32], total: f64) -> Self {
        let stride = (weights.len() / 1024).max(1);
        let mut values: Vec<f32> = Vec::with_capacity(weights.len() / stride + 1);
        values.extend(weights.iter().step_by(stride).filter(|&&w| w > 0.0));
        values.sort_unstable_by(|a, b| b.total_cmp(a));
        let sampled: f64 = values.iter().map(|&w| w as f64).sum();
        Self {
            count_scale: weights.len() as f64 / values.len().max(1) as f64,
            mass_scale: if sampled > 0.0 { total / sampled } else { 0.0 },
            values,
        }
    }

    /// The threshold of index `j`: +inf, a sampled weight, or 0 (every positive weight
    /// lies above it).
    fn threshold(&self, j: usize) -> f32 {
        match j {
            0 => f32::INFINITY,
            j => self.values.get(j - 1).copied().unwrap_or(0.0),
        }
    }

    /// The index of the 0 threshold.
    fn last(&self) -> usize {
        self.values.len() + 1
    }

    /// A first bracket (hi, lo) of threshold indices, hi < lo, around the place where
    /// `done` holds on the sample scaled up to the whole.
    fn bracket(&self, done: impl Fn(usize, f64) -> bool) -> (usize, usize) {
        const MARGIN: usize = 4;
        let mut mass = 0f64;
        let end = (0..self.values.len())
            .find(|&j| {
                mass += self.values[j] as f64;
                let count = ((j + 1) as f64 * self.count_scale) as usize;
                done(count, mass * self.mass_scale)
            })
            .map_or(self.last(), |j| j + 1);
        (end.saturating_sub(MARGIN), (end + MARGIN).min(self.last()))
    }

    /// Where the smallest prefix of `weights` for which `done` holds ends: from the
    /// guess of [`Sample::bracket`], a bracket widened until it holds the end, then
    /// halved while it holds many weights (ranking them costs more than a pass). `None`
    /// when `done` holds for no prefix.
    #[inline(always)]
    fn find_end(&self, weights: &[f32], done: impl Fn(usize, f64) -> bool) -> Option<End> {
        let probe = |j: usize| selected(weights, |w| w > self.threshold(j));
        let holds = |(count, mass): (usize, f64)| done(count, mass);
        let (mut hi, mut lo) = self.bracket(&done);
        let (mut at_hi, mut at_lo) = (probe(hi), probe(lo));
        loop {
            let width = lo - hi;
            if hi > 0 && holds(at_hi) {
                (lo, at_lo) = (hi, at_hi);
                hi = hi.saturating_sub(2 * width);
                at_hi = probe(hi);
            } else if !holds(at_lo) {
                if lo == self.last() {
                    return None;
                }
                (hi, at_hi) = (lo, at_lo);
                lo = (lo + 2 * width).min(self.last());
                at_lo = probe(lo);
            } else {
                break;
            }
        }
        while at_lo.0 - at_hi.0 > 2048 && lo - hi > 1 {
            let mid = (hi + lo) / 2;
            let at_mid = probe(mid);
            if holds(at_mid) {
                (lo, at_lo) = (mid, at_mid);
            } else {
                (hi, at_hi) = (mid, at_mid);
            }
        }
        Some(End {
            hi,
            lo,
            before: at_hi,
            inside: at_lo.0 - at_hi.0,
        })
    }
}

/// How many of `weights` pass `test`, and their sum in f64, in four lanes so that it
/// vectorises.
#[inline(always)]
fn selected(weights: &[f32], test: impl Fn(f32) -> bool) -> (usize, f64) {
    let mut lanes = [0f64; 4];
    let mut counts = [0usize; 4];
    let chunks = weights.chunks_exact(4);
    let (mut count, mut tail) = (0, 0f64);
    for &w in chunks.remainder().iter().filter(|&&w| test(w)) {
        count += 1;
        tail += w as f64;
    }
    for c in chunks {
        for l in 0..4 {
            let is = test(c[l]);
            lanes[l] += if is { c[l] as f64 } else { 0.0 };
            counts[l] += is as usize;
        }
    }
    (
        count + counts.iter().sum::<usize>(),
        lanes.iter().sum::<f64>() + tail,
    )
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

    /// Every token's probability after the filters.
    fn probs(dist: &TokenDist) -> Vec<f64> {
        let cdf = dist.filtered();
        cdf.weights.iter().map(|&w| w as f64 / cdf.total).collect()
    }

    fn kept(dist: &TokenDist) -> Vec<u32> {
        (0u32..)
            .zip(probs(dist))
            .filter(|&(_, p)| p > 0.0)
            .map(|(i, _)| i)
            .collect()
    }

    fn random_logits(n: usize, seed: u64, spread: f32) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>() * spread).collect()
    }

    /// Probabilities about 1/rank, over ids in a scattered order.
    fn zipf_logits(n: usize, seed: u64) -> Vec<f32> {
        let noise = random_logits(n, seed, 0.5);
        let rank = |i: usize| (1 + i * 7919 % n) as f32;
        (0..n).map(|i| noise[i] - rank(i).ln()).collect()
    }

    /// One token far likelier than every other.
    fn spike_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut logits = random_logits(n, seed, 1.0);
        logits[n / 3] = 20.0;
        logits
    }

    /// The tokens of positive probability, most likely first (ties by id).
    fn ranking(probs: &[f64]) -> Vec<u32> {
        let mut idx: Vec<u32> = (0..probs.len() as u32)
            .filter(|&i| probs[i as usize] > 0.0)
            .collect();
        idx.sort_by(|&a, &b| {
            probs[b as usize]
                .total_cmp(&probs[a as usize])
                .then(a.cmp(&b))
        });
        idx
    }

    /// The reference rule written naively: sort descending (ties by id), take tokens until
    /// the mass reaches p.
    fn naive_nucleus(probs: &[f64], p: f64) -> Vec<u32> {
        let mut mass = 0.0;
        let mut out = Vec::new();
        for i in ranking(probs) {
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
        let shapes = [
            random_logits(50, 1, 5.0),
            random_logits(5000, 2, 12.0),
            random_logits(50258, 3, 3.0),
            random_logits(300, 4, 0.0),
            // A trained model's: a heavy head and a long tail (Zipf), or one sure token.
            zipf_logits(50258, 5),
            spike_logits(50258, 6),
        ];
        for (shape, logits) in shapes.into_iter().enumerate() {
            let n = logits.len();
            let probs = probs(&TokenDist::new(&logits, u32::MAX, &Filter::default()));
            let ranked = ranking(&probs);
            for p in [0.1, 0.5, 0.9, 0.999] {
                let dist = TokenDist::new(
                    &logits,
                    u32::MAX,
                    &Filter {
                        top_p: p,
                        ..Filter::default()
                    },
                );
                let kept = kept(&dist);
                let expected = naive_nucleus(&probs, p * probs.iter().sum::<f64>());
                assert_eq!(kept, expected, "shape {shape} p {p}");
                let mass: f64 = kept.iter().map(|&i| probs[i as usize]).sum();
                assert!(mass >= p - 1e-6);
                // A draw's test agrees, around the nucleus's edge and over the rest.
                let target = dist.nucleus.expect("a nucleus");
                let edge = kept.len().saturating_sub(32)..(kept.len() + 32).min(ranked.len());
                let spread = ranked.iter().step_by(n.div_ceil(512));
                for &token in ranked[edge].iter().chain(spread) {
                    let inside = kept.binary_search(&token).is_ok();
                    assert_eq!(dist.keeps(token, target), inside, "shape {shape} p {p}");
                }
            }
            for k in [1, 7, n / 2] {
                let top_k = Filter {
                    top_k: Some(k),
                    ..Filter::default()
                };
                let kept = kept(&TokenDist::new(&logits, u32::MAX, &top_k));
                let mut expected = ranked.clone();
                expected.truncate(k);
                expected.sort();
                assert_eq!(kept, expected, "shape {shape} k {k}");
            }
        }
    }

    /// The vector units a CPU has change how fast a distribution is built and a nucleus
    /// draw tested, never their bits (which tokens a seed draws).
    #[test]
    fn every_build_gives_the_same_bits() {
        let filters = [
            Filter::default(),
            Filter {
                temperature: 0.7,
                top_k: Some(50),
                top_p: 0.9,
            },
        ];
        for logits in [random_logits(50258, 7, 3.0), zipf_logits(50258, 8)] {
            for filter in &filters {
                let (wide, narrow) = (
                    TokenDist::new(&logits, 50257, filter),
                    TokenDist::build(&logits, 50257, filter),
                );
                let bits = |d: &TokenDist| {
                    let weights = d.cdf.weights.iter().map(|w| w.to_bits() as u64);
                    let chunks = d.cdf.chunks.iter().map(|s| s.to_bits());
                    weights.chain(chunks).collect::<Vec<_>>()
                };
                assert_eq!(bits(&wide), bits(&narrow));
                assert_eq!(wide.cdf.total.to_bits(), narrow.cdf.total.to_bits());
                assert_eq!(
                    wide.nucleus.map(f64::to_bits),
                    narrow.nucleus.map(f64::to_bits)
                );
                assert_eq!(wide.top, narrow.top);
                // A nucleus draw's test: the mass ranked before a token.
                for token in (0..50258).step_by(997) {
                    let (dispatched, baseline) = (
                        wide.cdf.mass_before(token),
                        wide.cdf.mass_before_lanes(token),
                    );
                    assert_eq!(dispatched.to_bits(), baseline.to_bits());
                }
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
        assert_eq!(kept(&dist), [1, 2], "ties broken towards the lower id");
        assert_eq!(dist.top().0, 1);
        let probs = probs(&dist);
        assert!((probs[1] + probs[2] - 1.0).abs() < 1e-9);
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
        assert!(probs(&cold)[2] > 0.99);
        let hot = probs(&hot);
        assert!(hot[2] < 0.4 && hot[0] > 0.3);
    }

    /// Weights without mass draw the most likely token (the lowest id) instead of failing.
    #[test]
    fn a_distribution_without_mass_draws_its_top_token() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let nucleus = Filter {
            top_p: 0.9,
            ..Filter::default()
        };
        for filter in [Filter::default(), nucleus] {
            for (logits, excluded) in [(vec![1.0], 0), (vec![f32::NAN; 3], 7)] {
                let dist = TokenDist::new(&logits, excluded, &filter);
                assert_eq!(dist.draw(&mut rng, false), dist.top().0);
            }
        }
    }

    /// Draw frequencies match the probabilities within 5 standard errors: without a
    /// nucleus; with one, drawn by rejection; with one of a fifth of the mass, where a
    /// sixth of the draws build it after eight rejected tries.
    #[test]
    fn empirical_distribution_matches_the_model() {
        let logits = vec![0.0, 1.0, 2.0, -0.5, 1.5];
        let flat = vec![0.5; 5];
        let nucleus = |top_p| Filter {
            top_p,
            ..Filter::default()
        };
        let cases = [
            (&logits, Filter::default()),
            (&logits, nucleus(0.7)),
            (&flat, nucleus(0.1)),
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for (logits, filter) in cases {
            let dist = TokenDist::new(logits, u32::MAX, &filter);
            let n = 100_000;
            let mut counts = [0usize; 5];
            for _ in 0..n {
                counts[dist.draw(&mut rng, false) as usize] += 1;
            }
            for (&c, p) in counts.iter().zip(probs(&dist)) {
                let se = (p * (1.0 - p) / n as f64).sqrt();
                assert!(
                    (c as f64 / n as f64 - p).abs() <= 5.0 * se,
                    "{filter:?}: {counts:?} against {p}"
                );
            }
        }
        let dist = TokenDist::new(&logits, u32::MAX, &Filter::default());
        assert_eq!(dist.draw(&mut rng, true), 2);
    }
}
