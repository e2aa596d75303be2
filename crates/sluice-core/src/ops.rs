//! Portable element-wise kernels in f32, written to match the reference
//! (PyTorch) order of operations closely enough for the 1e-3 oracle bound.

use crate::AttnParams;
use std::sync::Arc;

/// RMSNorm of each `w.len()`-long row of `x`, in place:
/// `x · rsqrt(mean(x²) + eps) · w`.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for row in x.chunks_exact_mut(d) {
        let ss: f32 = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ss + eps).sqrt();
        for (v, &g) in row.iter_mut().zip(w) {
            *v = (*v * r) * g;
        }
    }
}

/// How rotary embedding pairs dimensions within a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Dimension `i` with `i + rot/2` (Hugging Face's rotate_half, GGUF "neox").
    Neox,
    /// Dimension `2i` with `2i + 1` (GGUF "norm", llama-arch files whose Q/K
    /// rows were permuted by the converter).
    Interleaved,
}

/// YaRN context extension (Hugging Face `rope_type: "yarn"`, GGUF
/// `rope.scaling.type = yarn`): each frequency is blended between the
/// original (extrapolated) and the `factor`-times slower (interpolated) one
/// by how many turns it makes over the original context, and cos and sin
/// are multiplied by `attn_factor`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    /// Context extension factor.
    pub factor: f32,
    /// Context length the model was trained at before extension.
    pub orig_ctx: usize,
    /// Rotations above which a frequency is kept as is.
    pub beta_fast: f32,
    /// Rotations below which a frequency is fully interpolated.
    pub beta_slow: f32,
    /// Multiplier of cos and sin (transformers' `attention_factor`).
    pub attn_factor: f32,
    /// Round the blending range outward to whole dimensions.
    pub truncate: bool,
}

impl Yarn {
    /// transformers' `get_mscale`: `0.1 · m · ln(factor) + 1` (1 when the
    /// factor does not extend).
    pub fn mscale(factor: f32, m: f32) -> f32 {
        if factor <= 1.0 {
            1.0
        } else {
            0.1 * m * factor.ln() + 1.0
        }
    }

    /// DeepSeek's q·k scale under YaRN: `mscale(factor, mscale_all_dim)²`
    /// over `sqrt(head_dim)`.
    pub fn qk_scale(&self, mscale_all_dim: f32, head_dim: usize) -> f32 {
        let s = Self::mscale(self.factor, mscale_all_dim);
        s * s / (head_dim as f32).sqrt()
    }

    /// Inverse frequencies of `rot_dim / 2` pairs for base `theta`.
    pub fn inv_freqs(&self, theta: f32, rot_dim: usize) -> Vec<f32> {
        // The correction range in f64, as Python's math computes it.
        let dim = rot_dim as f64;
        let corr = |rot: f64| {
            dim * (self.orig_ctx as f64 / (rot * 2.0 * std::f64::consts::PI)).ln()
                / (2.0 * (theta as f64).ln())
        };
        let (mut low, mut high) = (corr(self.beta_fast as f64), corr(self.beta_slow as f64));
        if self.truncate {
            low = low.floor();
            high = high.ceil();
        }
        let (low, mut high) = (low.max(0.0) as f32, high.min(dim - 1.0) as f32);
        if low == high {
            high += 0.001;
        }
        (0..rot_dim / 2)
            .map(|i| {
                let pos_freq = theta.powf((2 * i) as f32 / rot_dim as f32);
                let (extrap, interp) = (1.0 / pos_freq, 1.0 / (self.factor * pos_freq));
                let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                let keep = 1.0 - ramp;
                interp * (1.0 - keep) + extrap * keep
            })
            .collect()
    }
}

/// Rotary position embedding parameters.
#[derive(Clone, Debug)]
pub struct Rope {
    /// Base of the frequencies (`rope_theta`).
    pub theta: f32,
    /// Dimensions rotated per head (`head_dim` unless partial rotary).
    pub rot_dim: usize,
    /// Pairing convention.
    pub style: RopeStyle,
    /// YaRN scaling of the frequencies, if configured.
    pub yarn: Option<Yarn>,
    /// Per frequency, a divisor (`rot_dim / 2` of them): Llama 3's
    /// frequency scaling as llama.cpp stores it (`rope_freqs.weight`).
    pub factors: Option<Arc<[f32]>>,
}

impl Rope {
    /// `(cos, sin)` tables of positions `pos0..pos0 + n`, one after the
    /// other (for a device, whose own sin and cos lose accuracy far from
    /// zero).
    pub fn tables_for(&self, pos0: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.rot_dim / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(n * half), Vec::with_capacity(n * half));
        let (mut c1, mut s1) = (Vec::new(), Vec::new());
        for t in 0..n {
            self.tables(pos0 + t, &mut c1, &mut s1);
            cos.extend_from_slice(&c1);
            sin.extend_from_slice(&s1);
        }
        (cos, sin)
    }

    /// `(cos, sin)` tables for one position, `rot_dim / 2` entries each.
    pub fn tables(&self, pos: usize, cos: &mut Vec<f32>, sin: &mut Vec<f32>) {
        let half = self.rot_dim / 2;
        cos.clear();
        sin.clear();
        if let Some(y) = &self.yarn {
            for inv in y.inv_freqs(self.theta, self.rot_dim) {
                let a = pos as f32 * inv;
                cos.push(a.cos() * y.attn_factor);
                sin.push(a.sin() * y.attn_factor);
            }
            return;
        }
        for i in 0..half {
            let mut inv = 1.0 / self.theta.powf((2 * i) as f32 / self.rot_dim as f32);
            if let Some(f) = &self.factors {
                inv /= f[i];
            }
            let a = pos as f32 * inv;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }

    /// Rotates `n` rows of `x` (each `heads × head_dim`) at positions
    /// `pos0..pos0 + n`.
    pub fn apply_rows(&self, pos0: usize, x: &mut [f32], n: usize, head_dim: usize) {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        let d = x.len() / n.max(1);
        for (t, row) in x.chunks_exact_mut(d.max(1)).enumerate().take(n) {
            self.tables(pos0 + t, &mut cos, &mut sin);
            self.apply(row, head_dim, &cos, &sin);
        }
    }

    /// Rotates every head of one row (`heads × head_dim`) in place.
    pub fn apply(&self, row: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
        let half = self.rot_dim / 2;
        for h in row.chunks_exact_mut(head_dim) {
            match self.style {
                RopeStyle::Neox => {
                    for i in 0..half {
                        let (a, b) = (h[i], h[i + half]);
                        h[i] = a * cos[i] - b * sin[i];
                        h[i + half] = b * cos[i] + a * sin[i];
                    }
                }
                RopeStyle::Interleaved => {
                    for i in 0..half {
                        let (a, b) = (h[2 * i], h[2 * i + 1]);
                        h[2 * i] = a * cos[i] - b * sin[i];
                        h[2 * i + 1] = b * cos[i] + a * sin[i];
                    }
                }
            }
        }
    }
}

/// Router softmax and top-k: each of the `n` rows of `logits` becomes
/// probabilities in place, and `chosen[t·k..(t+1)·k]` receives row `t`'s `k`
/// most probable experts, most probable first, ties to the lower index.
pub fn route(logits: &mut [f32], n: usize, k: usize, chosen: &mut [usize]) {
    let ne = logits.len() / n.max(1);
    let mut idx: Vec<usize> = Vec::with_capacity(ne);
    for (probs, out) in logits.chunks_exact_mut(ne).zip(chosen.chunks_exact_mut(k)) {
        softmax(probs);
        idx.clear();
        idx.extend(0..ne);
        // A total order, so selecting the k best then sorting them is exact.
        let best = |a: &usize, b: &usize| probs[*b].total_cmp(&probs[*a]).then(a.cmp(b));
        idx.select_nth_unstable_by(k - 1, best);
        idx[..k].sort_unstable_by(best);
        out.copy_from_slice(&idx[..k]);
    }
}

/// Sigmoid routing (DeepSeek-V3, GLM-4.5): `scores` receives each
/// expert's `sigmoid(logit)`; the choice ranks `score + bias` (the bias
/// steers selection only), restricted to the `topk_group` groups of
/// `n_group` equal groups whose two best biased scores sum highest.
/// `chosen` receives
/// the `k` best, best first, ties to the lower index.
pub fn route_sigmoid(
    logits: &[f32],
    bias: Option<&[f32]>,
    (n_group, topk_group): (usize, usize),
    scores: &mut [f32],
    chosen: &mut [usize],
) {
    let ne = logits.len();
    for (s, &l) in scores.iter_mut().zip(logits) {
        *s = sigmoid(l);
    }
    let mut pick: Vec<f32> = match bias {
        Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
        None => scores.to_vec(),
    };
    let n_group = n_group.max(1);
    if n_group > 1 && topk_group < n_group && ne.is_multiple_of(n_group) {
        let size = ne / n_group;
        let group_score = |g: usize| {
            let mut v: Vec<f32> = pick[g * size..(g + 1) * size].to_vec();
            v.sort_unstable_by(|a, b| b.total_cmp(a));
            v.iter().take(2).sum::<f32>()
        };
        let gs: Vec<f32> = (0..n_group).map(group_score).collect();
        let mut groups: Vec<usize> = (0..n_group).collect();
        groups.sort_by(|&a, &b| gs[b].total_cmp(&gs[a]).then(a.cmp(&b)));
        for &g in &groups[topk_group..] {
            pick[g * size..(g + 1) * size].fill(f32::NEG_INFINITY);
        }
    }
    let k = chosen.len();
    let mut idx: Vec<usize> = (0..ne).collect();
    let best = |a: &usize, b: &usize| pick[*b].total_cmp(&pick[*a]).then(a.cmp(b));
    idx.select_nth_unstable_by(k - 1, best);
    idx[..k].sort_unstable_by(best);
    chosen.copy_from_slice(&idx[..k]);
}

/// Numerically stable softmax in place.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut s = 0.0;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    for v in x.iter_mut() {
        *v /= s;
    }
}

/// `silu(x) = x · sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `sigmoid(x)`.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `gate[i] = silu(gate[i]) · up[i]`, the SwiGLU activation, in place.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// `a · b` with eight independent accumulators, so the compiler emits SIMD
/// without reassociating anything.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Causal attention of query head `h` for the query row `qh` at position
/// `pos`.
#[allow(clippy::too_many_arguments)]
pub fn attend_head(
    qh: &[f32],
    k: &[f32],
    v: &[f32],
    pos: usize,
    h: usize,
    p: &AttnParams<'_>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let d = p.head_dim;
    let kvh = h / (p.n_heads / p.n_kv_heads);
    let kv_dim = p.n_kv_heads * d;
    let first = p.first_key(pos);
    scores.clear();
    for j in first..=pos {
        let kj = &k[j * kv_dim + kvh * d..j * kv_dim + kvh * d + d];
        scores.push(dot(qh, kj) * p.scale);
    }
    match p.sinks {
        // The sink takes its share of the probability and adds nothing.
        Some(s) => {
            scores.push(s[h]);
            softmax(scores);
            scores.pop();
        }
        None => softmax(scores),
    }
    out.fill(0.0);
    for (s, j) in scores.iter().zip(first..=pos) {
        let vj = &v[j * kv_dim + kvh * d..j * kv_dim + kvh * d + d];
        for (o, &x) in out.iter_mut().zip(vj) {
            *o += s * x;
        }
    }
}

/// Reference causal attention (see [`crate::Backend::attention`]).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    pos0: usize,
    p: &AttnParams<'_>,
    out: &mut [f32],
) {
    let d = p.head_dim;
    let q_dim = p.n_heads * d;
    let mut scores = Vec::new();
    for t in 0..n {
        for h in 0..p.n_heads {
            let qh = &q[t * q_dim + h * d..t * q_dim + h * d + d];
            let o = &mut out[t * q_dim + h * d..t * q_dim + h * d + d];
            attend_head(qh, k, v, pos0 + t, h, p, &mut scores, o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut x = vec![1.0, 3.0, -2.0, 9.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[3] > 0.99 && x[1] > x[0] && x[0] > x[2]);
        let mut big = vec![0.0, 1000.0];
        softmax(&mut big);
        assert_eq!(big, vec![0.0, 1.0]);
    }

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..37).map(|i| (i % 5) as f32 - 2.0).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-4);
    }

    #[test]
    fn rope_styles_rotate_different_pairs_and_keep_norms() {
        let rope = |style| Rope {
            theta: 10000.0,
            rot_dim: 4,
            style,
            yarn: None,
            factors: None,
        };
        let (mut c, mut s) = (Vec::new(), Vec::new());
        rope(RopeStyle::Neox).tables(3, &mut c, &mut s);
        let mut a = vec![1.0, 0.0, 0.0, 0.0];
        rope(RopeStyle::Neox).apply(&mut a, 4, &c, &s);
        let mut b = vec![1.0, 0.0, 0.0, 0.0];
        rope(RopeStyle::Interleaved).apply(&mut b, 4, &c, &s);
        // Neox pairs dim 0 with dim 2, interleaved pairs it with dim 1.
        assert!(a[2].abs() > 0.1 && a[1] == 0.0);
        assert!(b[1].abs() > 0.1 && b[2] == 0.0);
        let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
        assert!((n(&a) - 1.0).abs() < 1e-6 && (n(&b) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn sigmoid_routing_masks_groups_and_ignores_bias_in_scores() {
        // Four groups of two; the bias lifts expert 6 into the choice.
        let logits = [2.0, 1.9, -1.0, -1.0, 0.5, 0.4, 0.0, -3.0];
        let bias = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0];
        let mut scores = [0.0; 8];
        let mut chosen = [0; 3];
        route_sigmoid(&logits, Some(&bias), (4, 2), &mut scores, &mut chosen);
        // Groups {0,1} and {6,7} win; expert 4 (group 2) is masked out.
        assert_eq!(chosen, [6, 0, 1]);
        assert_eq!(scores[6], 0.5);
        route_sigmoid(&logits, None, (1, 1), &mut scores, &mut chosen);
        assert_eq!(chosen, [0, 1, 4]);
    }

    #[test]
    fn yarn_keeps_fast_and_slows_slow_frequencies() {
        let y = Yarn {
            factor: 40.0,
            orig_ctx: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attn_factor: 1.0,
            truncate: true,
        };
        let f = y.inv_freqs(10000.0, 64);
        let plain = |i: usize| 1.0 / 10000f32.powf((2 * i) as f32 / 64.0);
        assert_eq!(f[0], plain(0));
        assert!((f[31] / (plain(31) / 40.0) - 1.0).abs() < 1e-6);
        assert!((Yarn::mscale(40.0, 1.0) - (1.0 + 0.1 * 40f32.ln())).abs() < 1e-6);
    }

    #[test]
    fn attention_window_limits_keys() {
        // Two positions, one head; window 1 means each query sees only itself.
        let p = AttnParams {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 1,
            scale: 1.0,
            window: Some(1),
            chunk: None,
            sinks: None,
        };
        let (q, k, v) = (vec![1.0, 1.0], vec![1.0, 1.0], vec![5.0, 7.0]);
        let mut out = vec![0.0; 2];
        attention(&q, &k, &v, 2, 0, &p, &mut out);
        assert_eq!(out, vec![5.0, 7.0]);
        let p = AttnParams { window: None, ..p };
        attention(&q, &k, &v, 2, 0, &p, &mut out);
        assert_eq!(out[1], 6.0);
    }

    #[test]
    fn attention_chunks_start_over() {
        // Chunks of 2: position 2 starts a chunk and sees only itself,
        // position 3 sees 2 and 3, never 0 or 1.
        let p = AttnParams {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 1,
            scale: 1.0,
            window: None,
            chunk: Some(2),
            sinks: None,
        };
        let (q, k, v) = (vec![1.0; 4], vec![1.0; 4], vec![1.0, 3.0, 5.0, 7.0]);
        let mut out = vec![0.0; 4];
        attention(&q, &k, &v, 4, 0, &p, &mut out);
        assert_eq!(out, vec![1.0, 2.0, 5.0, 6.0]);
        assert_eq!((p.first_key(1), p.first_key(2), p.first_key(5)), (0, 2, 4));
        let both = AttnParams {
            window: Some(2),
            chunk: Some(4),
            ..p
        };
        assert_eq!((both.first_key(3), both.first_key(4)), (2, 4));
    }

    #[test]
    fn attention_sinks_take_a_share_without_a_value() {
        // One key of value 4; sinks of 0 (head 0) and -inf-like (head 1)
        // beside a score of 0: head 0 keeps half, head 1 all.
        let sinks = [0.0, -1e30];
        let p = AttnParams {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 1,
            scale: 1.0,
            window: None,
            chunk: None,
            sinks: Some(&sinks),
        };
        let mut out = vec![0.0; 2];
        attention(&[0.0, 0.0], &[1.0], &[4.0], 1, 0, &p, &mut out);
        assert_eq!(out, vec![2.0, 4.0]);
    }
}
