//! WGSL sources, assembled per weight type.
//!
//! Every quantized type is dequantized in units of 32 consecutive values of
//! a row (a Q4_0/Q8_0 block, a sub-block of a K-quant super-block, 32 MLX
//! values), so one matmul skeleton serves them all: a workgroup owns one
//! output row and a tile of up to [`TILE`] tokens; its invocations stride
//! over the row's units, dequantize each once and dot it with every token
//! of the tile, then reduce (with subgroup adds when the adapter has them).
//! The per-type decoders mirror `sluice_core::quant` operation for
//! operation, so a dequantized value is the CPU's value exactly; only the
//! order of the sums differs.

use sluice_core::{DType, HalfType};

/// Tokens per workgroup tile: a row is dequantized once per tile.
pub const TILE: u32 = 8;

/// Largest workgroup size the reduction buffer holds.
pub const MAX_WG: u32 = 256;

const PRELUDE: &str = r#"
struct P {
    rows: u32,
    cols: u32,
    n: u32,
    row_bytes: u32,
    y_stride: u32,
    y_off: u32,
    units: u32,
    aux_row: u32,
    w_off: u32,
    sc_off: u32,
    bi_off: u32,
    pad: u32,
}
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> p: P;
@group(0) @binding(4) var<storage, read> sc: array<u32>;
@group(0) @binding(5) var<storage, read> bi: array<u32>;

override WG: u32 = 64u;
const TT: u32 = 8u;
var<private> v: array<f32, 32>;
var<workgroup> part: array<f32, 2048>;
"#;

/// Weights as words, read at any byte offset.
const WORDS: &str = r#"
@group(0) @binding(0) var<storage, read> w: array<u32>;
fn byte(o: u32) -> u32 { return (w[o >> 2u] >> ((o & 3u) << 3u)) & 255u; }
fn u16at(o: u32) -> u32 { return byte(o) | (byte(o + 1u) << 8u); }
fn u32at(o: u32) -> u32 { return u16at(o) | (u16at(o + 2u) << 16u); }
fn f16at(o: u32) -> f32 { return unpack2x16float(u16at(o)).x; }
fn i8of(b: u32) -> i32 { return bitcast<i32>(b << 24u) >> 24u; }
fn fp8(b: u32) -> f32 {
    let e = (b >> 3u) & 15u; let m = b & 7u;
    var a = bitcast<f32>(((e + 120u) << 23u) | (m << 20u));
    if (e == 0u) { a = ldexp(f32(m), -9); }
    if (e == 15u && m == 7u) { a = bitcast<f32>(0x7fc00000u); }
    return select(a, -a, b >= 128u);
}
fn mxfp4(q: u32) -> f32 {
    let m = q & 7u;
    let big = f32((4u + 2u * (m & 1u)) << ((max(m, 4u) - 4u) >> 1u));
    // Code 8 (-0) decodes to +0, as on the host.
    return select(1.0, -1.0, q >= 8u && m != 0u) * select(f32(m), big, m >= 4u);
}
"#;

/// The decoder of one type: `fn deq(rb, u, r)` fills `v` with values
/// `32u..32u+32` of the row starting at byte `rb` (row `r` of the chunk).
fn decoder(dtype: DType, f16: bool) -> String {
    let body = match dtype {
        DType::F32 => {
            "let e0 = u * 32u; let lim = min(32u, p.cols - e0);
             for (var i = 0u; i < lim; i++) { v[i] = bitcast<f32>(w[(rb >> 2u) + e0 + i]); }"
        }
        DType::F16 if f16 => {
            // Native half loads where the adapter has SHADER_F16.
            "let e0 = u * 32u; let lim = min(32u, p.cols - e0);
             for (var i = 0u; i < lim; i++) { v[i] = f32(wh[(rb >> 1u) + e0 + i]); }"
        }
        DType::F16 => {
            "let e0 = u * 32u; let lim = min(32u, p.cols - e0);
             for (var i = 0u; i < lim; i++) { v[i] = f16at(rb + 2u * (e0 + i)); }"
        }
        DType::BF16 => {
            "let e0 = u * 32u; let lim = min(32u, p.cols - e0);
             for (var i = 0u; i < lim; i++) { v[i] = bitcast<f32>(u16at(rb + 2u * (e0 + i)) << 16u); }"
        }
        DType::Q4_0 => {
            "let o = rb + u * 18u; let d = f16at(o);
             for (var j = 0u; j < 16u; j++) {
                 let q = byte(o + 2u + j);
                 v[j] = f32(i32(q & 15u) - 8) * d;
                 v[j + 16u] = f32(i32(q >> 4u) - 8) * d;
             }"
        }
        DType::Q4_1 => {
            "let o = rb + u * 20u; let d = f16at(o); let m = f16at(o + 2u);
             for (var j = 0u; j < 16u; j++) {
                 let q = byte(o + 4u + j);
                 v[j] = f32(q & 15u) * d + m;
                 v[j + 16u] = f32(q >> 4u) * d + m;
             }"
        }
        DType::Q5_0 => {
            "let o = rb + u * 22u; let d = f16at(o); let qh = u32at(o + 2u);
             for (var j = 0u; j < 16u; j++) {
                 let q = byte(o + 6u + j);
                 let h0 = ((qh >> j) << 4u) & 16u;
                 let h1 = (qh >> (j + 12u)) & 16u;
                 v[j] = f32(i32((q & 15u) | h0) - 16) * d;
                 v[j + 16u] = f32(i32((q >> 4u) | h1) - 16) * d;
             }"
        }
        DType::Q5_1 => {
            "let o = rb + u * 24u; let d = f16at(o); let m = f16at(o + 2u); let qh = u32at(o + 4u);
             for (var j = 0u; j < 16u; j++) {
                 let q = byte(o + 8u + j);
                 let h0 = ((qh >> j) << 4u) & 16u;
                 let h1 = (qh >> (j + 12u)) & 16u;
                 v[j] = f32((q & 15u) | h0) * d + m;
                 v[j + 16u] = f32((q >> 4u) | h1) * d + m;
             }"
        }
        DType::Q8_0 => {
            "let o = rb + u * 34u; let d = f16at(o);
             for (var j = 0u; j < 32u; j++) { v[j] = f32(i8of(byte(o + 2u + j))) * d; }"
        }
        DType::MXFP4 => {
            // 2^(e - 128) from the exponent byte (ggml's half E8M0), and the
            // doubled E2M1 magnitudes 0,1,2,3,4,6,8,12 computed from the
            // code's three low bits: m, or (4 + 2·(m & 1)) << ((m - 4) >> 1).
            "let o = rb + u * 17u; let e = byte(o);
             let d = select(bitcast<f32>((e - 1u) << 23u), bitcast<f32>(0x00200000u << e), e < 2u);
             for (var j = 0u; j < 16u; j++) {
                 let q = byte(o + 1u + j);
                 v[j] = mxfp4(q & 15u) * d;
                 v[j + 16u] = mxfp4(q >> 4u) * d;
             }"
        }
        DType::Q2_K => {
            "let o = rb + (u >> 3u) * 84u; let s = u & 7u; let n = s >> 2u; let si = s & 3u;
             let d = f16at(o + 80u); let mn = f16at(o + 82u);
             for (var i = 0u; i < 32u; i++) {
                 let q = (byte(o + 16u + n * 32u + i) >> (2u * si)) & 3u;
                 let scb = byte(o + n * 8u + si * 2u + (i >> 4u));
                 let dl = d * f32(scb & 15u);
                 let ml = mn * f32(scb >> 4u);
                 v[i] = dl * f32(q) - ml;
             }"
        }
        DType::Q3_K => {
            "let o = rb + (u >> 3u) * 110u; let s = u & 7u; let n = s >> 2u; let si = s & 3u;
             let d = f16at(o + 108u); let m = 1u << (4u * n + si);
             for (var i = 0u; i < 32u; i++) {
                 let j = n * 8u + si * 2u + (i >> 4u);
                 var lo: u32;
                 if (j < 8u) { lo = byte(o + 96u + j) & 15u; } else { lo = byte(o + 96u + j - 8u) >> 4u; }
                 let hi = (byte(o + 104u + (j & 3u)) >> (2u * (j >> 2u))) & 3u;
                 let dl = d * f32(i32(lo | (hi << 4u)) - 32);
                 let q = (byte(o + 32u + n * 32u + i) >> (2u * si)) & 3u;
                 var h = 4;
                 if ((byte(o + i) & m) != 0u) { h = 0; }
                 v[i] = dl * f32(i32(q) - h);
             }"
        }
        DType::Q4_K => {
            "let o = rb + (u >> 3u) * 144u; let s = u & 7u; let j = s >> 1u;
             let d = f16at(o); let mn = f16at(o + 2u);
             var scv: u32; var mv: u32;
             if (s < 4u) {
                 scv = byte(o + 4u + s) & 63u; mv = byte(o + 8u + s) & 63u;
             } else {
                 scv = (byte(o + 8u + s) & 15u) | ((byte(o + s) >> 6u) << 4u);
                 mv = (byte(o + 8u + s) >> 4u) | ((byte(o + 4u + s) >> 6u) << 4u);
             }
             let dl = d * f32(scv); let ml = mn * f32(mv); let sh = 4u * (s & 1u);
             for (var l = 0u; l < 32u; l++) {
                 v[l] = dl * f32((byte(o + 16u + 32u * j + l) >> sh) & 15u) - ml;
             }"
        }
        DType::Q5_K => {
            "let o = rb + (u >> 3u) * 176u; let s = u & 7u; let j = s >> 1u;
             let d = f16at(o); let mn = f16at(o + 2u);
             var scv: u32; var mv: u32;
             if (s < 4u) {
                 scv = byte(o + 4u + s) & 63u; mv = byte(o + 8u + s) & 63u;
             } else {
                 scv = (byte(o + 8u + s) & 15u) | ((byte(o + s) >> 6u) << 4u);
                 mv = (byte(o + 8u + s) >> 4u) | ((byte(o + 4u + s) >> 6u) << 4u);
             }
             let dl = d * f32(scv); let ml = mn * f32(mv); let sh = 4u * (s & 1u);
             for (var l = 0u; l < 32u; l++) {
                 let h = ((byte(o + 16u + l) >> s) & 1u) << 4u;
                 v[l] = dl * f32(((byte(o + 48u + 32u * j + l) >> sh) & 15u) + h) - ml;
             }"
        }
        DType::Q6_K => {
            "let o = rb + (u >> 3u) * 210u; let s = u & 7u; let n = s >> 2u; let r4 = s & 3u;
             let d = f16at(o + 208u);
             for (var l = 0u; l < 32u; l++) {
                 let ql = (byte(o + 64u * n + l + 32u * (r4 & 1u)) >> (4u * (r4 >> 1u))) & 15u;
                 let qh = (byte(o + 128u + 32u * n + l) >> (2u * r4)) & 3u;
                 let q = i32(ql | (qh << 4u)) - 32;
                 let scl = f32(i8of(byte(o + 192u + 8u * n + (l >> 4u) + 2u * r4)));
                 v[l] = d * scl * f32(q);
             }"
        }
        DType::FP8(_) => {
            // The backend expands the scale grid to one f32 line per row.
            "let e0 = u * 32u; let lim = min(32u, p.cols - e0); let sr = r * p.aux_row;
             for (var i = 0u; i < lim; i++) {
                 let c = e0 + i;
                 v[i] = fp8(byte(rb + c)) * bitcast<f32>(sc[sr + c / BC]);
             }"
        }
        DType::Mlx(_) => {
            "let wb = (rb >> 2u) + u * BITS;
             let gi = r * p.aux_row + (u * 32u) / GROUP;
             let s = scale(gi); let b = bias(gi);
             let mask = (1u << BITS) - 1u;
             for (var i = 0u; i < 32u; i++) {
                 let bit = i * BITS; let wi = bit >> 5u; let sh = bit & 31u;
                 var q = w[wb + wi] >> sh;
                 if (sh + BITS > 32u) { q = q | (w[wb + wi + 1u] << (32u - sh)); }
                 v[i] = s * f32(q & mask) + b;
             }"
        }
    };
    let mut src = String::new();
    if let DType::Mlx(q) = dtype {
        let conv = |a: &str| {
            match q.scales {
            HalfType::F32 => format!("return bitcast<f32>({a}[i]);"),
            HalfType::F16 => {
                format!("let wd = {a}[i >> 1u]; return unpack2x16float(wd >> (16u * (i & 1u))).x;")
            }
            HalfType::Bf16 => format!(
                "let wd = {a}[i >> 1u]; return bitcast<f32>(((wd >> (16u * (i & 1u))) & 65535u) << 16u);"
            ),
        }
        };
        src.push_str(&format!(
            "const BITS: u32 = {}u;\nconst GROUP: u32 = {}u;\n\
             fn scale(g: u32) -> f32 {{ let i = g + p.sc_off; {} }}\n\
             fn bias(g: u32) -> f32 {{ let i = g + p.bi_off; {} }}\n",
            q.bits,
            q.group,
            conv("sc"),
            conv("bi")
        ));
    }
    if let DType::FP8(q) = dtype {
        src.push_str(&format!("const BC: u32 = {}u;\n", q.block_cols));
    }
    src.push_str(&format!("fn deq(rb: u32, u: u32, r: u32) {{\n{body}\n}}\n"));
    src
}

/// The matmul entry point; `subgroups` picks the reduction.
fn matmul_main(subgroups: bool) -> String {
    let (extra_args, reduce) = if subgroups {
        (
            ", @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_id) sg: u32, @builtin(num_subgroups) nsg: u32",
            "for (var t = 0u; t < TT; t++) {
                 let s = subgroupAdd(acc[t]);
                 if (lane == 0u) { part[sg * TT + t] = s; }
             }
             workgroupBarrier();
             if (li == 0u) {
                 for (var t = 0u; t < nt; t++) {
                     var s = 0.0;
                     for (var g = 0u; g < nsg; g++) { s += part[g * TT + t]; }
                     y[(t0 + t) * p.y_stride + p.y_off + r] = s;
                 }
             }",
        )
    } else {
        (
            "",
            "for (var t = 0u; t < TT; t++) { part[t * WG + li] = acc[t]; }
             workgroupBarrier();
             for (var h = WG / 2u; h > 0u; h = h >> 1u) {
                 if (li < h) {
                     for (var t = 0u; t < TT; t++) { part[t * WG + li] += part[t * WG + li + h]; }
                 }
                 workgroupBarrier();
             }
             if (li == 0u) {
                 for (var t = 0u; t < nt; t++) { y[(t0 + t) * p.y_stride + p.y_off + r] = part[t * WG]; }
             }",
        )
    };
    format!(
        "@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32{extra_args}) {{
    let r = wid.x + wid.y * nwg.x;
    if (r >= p.rows) {{ return; }}
    let t0 = wid.z * TT;
    let nt = min(TT, p.n - t0);
    var acc: array<f32, 8>;
    let rb = p.w_off + r * p.row_bytes;
    for (var u = li; u < p.units; u += WG) {{
        deq(rb, u, r);
        let e0 = u * 32u;
        let lim = min(32u, p.cols - e0);
        for (var t = 0u; t < nt; t++) {{
            let xo = (t0 + t) * p.cols + e0;
            var s = 0.0;
            for (var i = 0u; i < lim; i++) {{ s += v[i] * x[xo + i]; }}
            acc[t] += s;
        }}
    }}
    {reduce}
}}
"
    )
}

/// `f(k)` for `k` in `0..n`, one per line: the decode kernels are written
/// out unrolled, so every value lives in a register. CPU adapters
/// (llvmpipe) keep arrays indexed by a loop counter in memory and access
/// them lane by lane, which cost more than the arithmetic.
fn unroll(n: usize, f: impl Fn(usize) -> String) -> String {
    (0..n).map(f).collect::<Vec<_>>().join("\n")
}

/// Defines `{p}0..{p}{n-1}`: the `n` little-endian words starting at byte
/// `{base}` (an even offset), from `n + 1` aligned loads.
fn words_at(p: &str, base: &str, n: usize) -> String {
    format!(
        "let {p}a = ({base}) >> 2u; let {p}m = (({base}) & 2u) != 0u;\n{}\n{}",
        unroll(n + 1, |k| format!("let {p}e{k} = w[{p}a + {k}u];")),
        unroll(n, |k| format!(
            "let {p}{k} = select({p}e{k}, ({p}e{k} >> 16u) | ({p}e{} << 16u), {p}m);",
            k + 1
        ))
    )
}

/// A block of an f16 scale followed by `n` words of quants, at the even
/// byte offset `o`: defines `d` and `q0..q{n-1}` from `n + 1` loads.
fn scaled_block(n: usize) -> String {
    format!(
        "let a = o >> 2u; let odd = (o & 2u) != 0u;\n{}\n{}\nlet d = unpack2x16float(select(e0, e0 >> 16u, odd)).x;",
        unroll(n + 1, |k| format!("let e{k} = w[a + {k}u];")),
        unroll(n, |k| format!(
            "let q{k} = select((e{k} >> 16u) | (e{} << 16u), e{}, odd);",
            k + 1,
            k + 1
        ))
    )
}

/// A fused decode-and-dot of one unit (32 values) for the hottest types,
/// against the unit's activations `x0..x7` (vec4) whose sum is `xs`.
/// Words are unpacked four values at a time, the scales applied once per
/// unit. `None`: the generic decoder.
fn fused(dtype: DType) -> Option<String> {
    const M: &str = "0x0f0f0f0fu";
    Some(match dtype {
        DType::Q4_0 => format!(
            "let o = rb + u * 18u;\n{}\nvar s = 0.0;\n{}\nreturn d * (s - 8.0 * xs);",
            scaled_block(4),
            unroll(4, |k| format!(
                "s += dot(u4(q{k} & {M}), x{k}) + dot(u4((q{k} >> 4u) & {M}), x{});",
                k + 4
            ))
        ),
        DType::Q8_0 => format!(
            "let o = rb + u * 34u;\n{}\nvar s = 0.0;\n{}\nreturn d * s;",
            scaled_block(8),
            unroll(8, |k| format!("s += dot(i4(q{k}), x{k});"))
        ),
        // Super-blocks of 144 bytes (always word-aligned): d and dmin, 12
        // bytes of 6-bit scales and mins, then 128 bytes of nibbles shared
        // by unit pairs.
        DType::Q4_K => format!(
            "let a = (rb >> 2u) + (u >> 3u) * 36u; let sb = u & 7u; let j = sb >> 1u;
             let h0 = w[a]; let h1 = w[a + 1u]; let h2 = w[a + 2u]; let h3 = w[a + 3u];
             let lo = select(h1, h2, sb >= 4u) >> (8u * (sb & 3u));
             let hi = select(h2, h3, sb >= 4u) >> (8u * (sb & 3u));
             let l4 = h1 >> (8u * (sb & 3u));
             var scv = lo & 63u; var mv = hi & 63u;
             if (sb >= 4u) {{
                 scv = (hi & 15u) | (((l4 & 255u) >> 6u) << 4u);
                 mv = ((hi & 255u) >> 4u) | ((((h2 >> (8u * (sb & 3u))) & 255u) >> 6u) << 4u);
             }}
             let sh = 4u * (sb & 1u); let qa = a + 4u + 8u * j; var s = 0.0;
             {}
             let dm = unpack2x16float(h0);
             return dm.x * f32(scv) * s - dm.y * f32(mv) * xs;",
            unroll(8, |k| format!(
                "s += dot(u4((w[qa + {k}u] >> sh) & {M}), x{k});"
            ))
        ),
        // Super-blocks of 210 bytes (even offsets): low nibbles, high
        // 2-bit pairs, 16 signed 8-bit scales, d.
        DType::Q6_K => format!(
            "let o = rb + (u >> 3u) * 210u; let sb = u & 7u; let n = sb >> 2u; let r4 = sb & 3u;
             {}
             {}
             let sh = 4u * (r4 >> 1u); let hs = 2u * r4; var s0 = 0.0; var s1 = 0.0;
             {}
             let c = o + 192u + 8u * n + 2u * r4;
             let cw = w[c >> 2u] >> ((c & 2u) * 8u);
             let dw = w[(o + 208u) >> 2u] >> (((o + 208u) & 2u) * 8u);
             return unpack2x16float(dw).x * (f32(i8of(cw & 255u)) * s0 + f32(i8of((cw >> 8u) & 255u)) * s1);",
            words_at("l", "o + 64u * n + 32u * (r4 & 1u)", 8),
            words_at("g", "o + 128u + 32u * n", 8),
            unroll(8, |k| format!(
                "s{} += dot(u4(((l{k} >> sh) & {M}) | (((g{k} >> hs) & 0x03030303u) << 4u)) - 32.0, x{k});",
                k / 4
            ))
        ),
        DType::Mlx(q) if q.bits == 4 => format!(
            "let wb = (rb >> 2u) + u * 4u;
             let gi = r * p.aux_row + (u * 32u) / GROUP;
             var s = 0.0;
             {}
             return scale(gi) * s + bias(gi) * xs;",
            unroll(4, |k| {
                let (a, b) = (2 * k, 2 * k + 1);
                format!(
                    "let q{k} = w[wb + {k}u];
                     s += dot(u4(q{k} & {M}), vec4<f32>(x{a}.x, x{a}.z, x{b}.x, x{b}.z))
                        + dot(u4((q{k} >> 4u) & {M}), vec4<f32>(x{a}.y, x{a}.w, x{b}.y, x{b}.w));"
                )
            })
        ),
        _ => return None,
    })
}

const MATVEC_HELPERS: &str = r#"
@group(0) @binding(1) var<storage, read> xv: array<vec4<f32>>;
fn u4(q: u32) -> vec4<f32> {
    return vec4<f32>(f32(q & 255u), f32((q >> 8u) & 255u), f32((q >> 16u) & 255u), f32(q >> 24u));
}
fn i4(q: u32) -> vec4<f32> {
    let v = bitcast<i32>(q);
    return vec4<f32>(f32((v << 24u) >> 24u), f32((v << 16u) >> 24u), f32((v << 8u) >> 24u), f32(v >> 24u));
}
"#;

/// Rows each invocation owns in the per-invocation matvec on CPU adapters:
/// a unit's activations are loaded once for all of them. Llvmpipe before
/// Mesa 26 pays a per-lane round trip for every storage load, so sharing
/// loads across many rows wins (Mesa 22.3: Q4_0 0.55 GB/s at 16 rows, 0.43
/// at 8); from Mesa 26 loads are cheap and more invocations win (26.1: 1.7
/// at 8, 1.6 at 16). Measurements in docs/BENCHMARKS.md.
pub const CPU_ROWS_PER_INVOCATION: u32 = 16;

/// [`CPU_ROWS_PER_INVOCATION`] for llvmpipe from Mesa 26 on.
pub const CPU_ROWS_PER_INVOCATION_MESA26: u32 = 8;

/// Rows per invocation for a CPU adapter whose driver reports
/// `driver_info` (e.g. `Mesa 26.1.6-1 (LLVM 19.1.7)`).
pub fn cpu_rows_per_invocation(driver_info: &str) -> u32 {
    let major = driver_info
        .split("Mesa ")
        .nth(1)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse::<u32>().ok());
    match major {
        Some(m) if m >= 26 => CPU_ROWS_PER_INVOCATION_MESA26,
        _ => CPU_ROWS_PER_INVOCATION,
    }
}

/// Loads unit `u`'s activations into `x0..x7` and their sum into `xs`.
fn load_unit(indent: &str) -> String {
    format!(
        "{indent}let i = u * 8u;\n{}\n{indent}let xs = dot(x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7, vec4<f32>(1.0));",
        unroll(8, |k| format!("{indent}let x{k} = xv[i + {k}u];"))
    )
}

/// The single-token (decode) shader for a quantized `dtype`. With
/// `rows_per_invocation` > 0, each invocation owns that many whole output
/// rows: no reduction and no barrier (CPU adapters such as lavapipe, whose
/// barriers switch coroutines, run this fastest), and each unit's
/// activations are loaded once for all the rows. With 0, a workgroup owns
/// a row and its invocations stride over the row's units (coalesced reads
/// on GPUs).
pub fn matvec(dtype: DType, subgroups: bool, rows_per_invocation: u32) -> String {
    let mut s = String::new();
    s.push_str(&PRELUDE.replace(
        "@group(0) @binding(1) var<storage, read> x: array<f32>;\n",
        "",
    ));
    s.push_str(WORDS);
    s.push_str(MATVEC_HELPERS);
    s.push_str(&decoder(dtype, false));
    let body = fused(dtype).unwrap_or_else(|| {
        format!(
            "deq(rb, u, r); var s = 0.0;\n{}\nreturn s;",
            unroll(8, |k| format!(
                "s += dot(vec4<f32>(v[{}], v[{}], v[{}], v[{}]), x{k});",
                4 * k,
                4 * k + 1,
                4 * k + 2,
                4 * k + 3
            ))
        )
    });
    let xargs = unroll(8, |k| format!("x{k}: vec4<f32>, ")).replace('\n', "");
    s.push_str(&format!(
        "fn dotx(rb: u32, u: u32, r: u32, {xargs}xs: f32) -> f32 {{\n{body}\n}}\n"
    ));
    let xs = unroll(8, |k| format!("x{k}, ")).replace('\n', "");
    let rl = rows_per_invocation as usize;
    if rl > 0 {
        s.push_str(&format!(
            "@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {{
    let first = (gid.x + gid.y * nwg.x * WG) * {rl}u;
    if (first >= p.rows) {{ return; }}
{}
    for (var u = 0u; u < p.units; u++) {{
{}
{}
    }}
{}
}}
",
            unroll(rl, |j| format!(
                "    let r{j} = min(first + {j}u, p.rows - 1u); let rb{j} = p.w_off + r{j} * p.row_bytes; var acc{j} = 0.0;"
            )),
            load_unit("        "),
            unroll(rl, |j| format!("        acc{j} += dotx(rb{j}, u, r{j}, {xs}xs);")),
            unroll(rl, |j| format!(
                "    if (first + {j}u < p.rows) {{ y[p.y_off + first + {j}u] = acc{j}; }}"
            )),
        ));
        return s;
    }
    let (extra_args, reduce) = if subgroups {
        (
            ", @builtin(subgroup_invocation_id) lane: u32, @builtin(subgroup_id) sg: u32, @builtin(num_subgroups) nsg: u32",
            "let t = subgroupAdd(acc);
             if (lane == 0u) { part[sg] = t; }
             workgroupBarrier();
             if (li == 0u) {
                 var s = 0.0;
                 for (var g = 0u; g < nsg; g++) { s += part[g]; }
                 y[p.y_off + r] = s;
             }",
        )
    } else {
        (
            "",
            "part[li] = acc;
             workgroupBarrier();
             for (var h = WG / 2u; h > 0u; h = h >> 1u) {
                 if (li < h) { part[li] += part[li + h]; }
                 workgroupBarrier();
             }
             if (li == 0u) { y[p.y_off + r] = part[0]; }",
        )
    };
    s.push_str(&format!(
        "@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32{extra_args}) {{
    let r = wid.x + wid.y * nwg.x;
    if (r >= p.rows) {{ return; }}
    let rb = p.w_off + r * p.row_bytes;
    var acc = 0.0;
    for (var u = li; u < p.units; u += WG) {{
{}
        acc += dotx(rb, u, r, {xs}xs);
    }}
    {reduce}
}}
",
        load_unit("        ")
    ));
    s
}

/// The whole matmul shader for `dtype`.
pub fn matmul(dtype: DType, subgroups: bool, f16: bool) -> String {
    let mut s = weight_shader(dtype, f16);
    s.push_str(&matmul_main(subgroups));
    s
}

/// The bindings, the weight's reads and the decoder of `dtype`: what the
/// matmul and row-gather shaders share.
fn weight_shader(dtype: DType, f16: bool) -> String {
    let mut s = String::new();
    if f16 && dtype == DType::F16 {
        s.push_str("enable f16;\n");
    }
    s.push_str(PRELUDE);
    if f16 && dtype == DType::F16 {
        s.push_str("@group(0) @binding(0) var<storage, read> wh: array<f16>;\n");
    } else {
        s.push_str(WORDS);
    }
    s.push_str(&decoder(dtype, f16));
    s
}

/// The row-gather shader for `dtype`: rows `x[t]` (u32 bits) of a weight
/// dequantized into `y[t]`, one invocation per row unit. A weight split
/// into chunks is gathered chunk by chunk; each writes the rows it holds.
pub fn rows(dtype: DType, f16: bool) -> String {
    let mut s = weight_shader(dtype, f16);
    s.push_str(
        "@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.n * p.units) { return; }
    let t = i / p.units; let u = i % p.units;
    let tok = bitcast<u32>(x[t]);
    if (tok < p.y_off || tok >= p.y_off + p.rows) { return; }
    let r = tok - p.y_off;
    deq(p.w_off + r * p.row_bytes, u, r);
    let e0 = u * 32u; let lim = min(32u, p.cols - e0);
    for (var j = 0u; j < lim; j++) { y[t * p.cols + e0 + j] = v[j]; }
}
",
    );
    s
}

/// Element-wise and attention kernels on f32 activations.
pub const OPS: &str = r#"
struct Q {
    n: u32,
    d: u32,
    a: u32,
    b: u32,
    c: u32,
    e: u32,
    f0: f32,
    f1: f32,
}
@group(0) @binding(0) var<storage, read_write> xa: array<f32>;
@group(0) @binding(1) var<storage, read> xb: array<f32>;
@group(0) @binding(2) var<storage, read> xc: array<f32>;
@group(0) @binding(3) var<uniform> q: Q;
@group(0) @binding(4) var<storage, read_write> xo: array<f32>;
@group(0) @binding(5) var<storage, read_write> idx: array<u32>;

override WG: u32 = 64u;
var<workgroup> red: array<f32, 256>;
var<workgroup> redi: array<u32, 256>;

fn wsum(li: u32, v: f32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h = h >> 1u) {
        if (li < h) { red[li] += red[li + h]; }
        workgroupBarrier();
    }
    let s = red[0];
    workgroupBarrier();
    return s;
}

fn wmax(li: u32, v: f32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h = h >> 1u) {
        if (li < h) { red[li] = max(red[li], red[li + h]); }
        workgroupBarrier();
    }
    let s = red[0];
    workgroupBarrier();
    return s;
}

// RMSNorm of row wid.x of xa (q.d wide) by weight xb, eps q.f0.
@compute @workgroup_size(WG)
fn rms_norm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let o = wid.x * q.d;
    var ss = 0.0;
    for (var i = li; i < q.d; i += WG) { ss += xa[o + i] * xa[o + i]; }
    let tot = wsum(li, ss) / f32(q.d);
    let r = 1.0 / sqrt(tot + q.f0);
    for (var i = li; i < q.d; i += WG) { xa[o + i] = (xa[o + i] * r) * xb[i]; }
}

// xa = silu(xa) * xb, element-wise over q.n values.
@compute @workgroup_size(WG)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= q.n) { return; }
    let g = xa[i];
    xa[i] = (g / (1.0 + exp(-g))) * xb[i];
}

// The element index of a flat dispatch.
fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * WG;
}

// gpt-oss's clamped SwiGLU over q.n values: with g = min(xa, q.f1),
// xa = (clamp(xb, -q.f1, q.f1) + 1) * g / (1 + exp(-q.f0 * g)).
@compute @workgroup_size(WG)
fn clamped_swiglu(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= q.n) { return; }
    let g = min(xa[i], q.f1);
    let u = clamp(xb[i], -q.f1, q.f1);
    xa[i] = (u + 1.0) * g / (1.0 + exp(-q.f0 * g));
}

// xa[row(j)] += c(j) * xb[j] over q.n values in rows of q.d: row(j) is
// idx[j] when q.a & 1 (rows distinct), else j; c(j) is xc[j] when q.a & 2,
// through a sigmoid when q.a & 4, else 1.
@compute @workgroup_size(WG)
fn axpy(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= q.n) { return; }
    let j = i / q.d;
    var r = j;
    if ((q.a & 1u) != 0u) { r = idx[j]; }
    var c = 1.0;
    if ((q.a & 2u) != 0u) {
        c = xc[j];
        if ((q.a & 4u) != 0u) { c = 1.0 / (1.0 + exp(-c)); }
    }
    let o = r * q.d + i % q.d;
    xa[o] = xa[o] + c * xb[i];
}

// xa[j] = xb[idx[j]] * (xc[j] when q.a & 2, else 1) over q.n values in
// rows of q.d.
@compute @workgroup_size(WG)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= q.n) { return; }
    let j = i / q.d;
    let v = xb[idx[j] * q.d + i % q.d];
    if ((q.a & 2u) != 0u) { xa[i] = v * xc[j]; } else { xa[i] = v; }
}

// xa[i] += xb[i % q.d] over q.n values (a bias on every row).
@compute @workgroup_size(WG)
fn add_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= q.n) { return; }
    xa[i] = xa[i] + xb[i % q.d];
}

// xa = clamp(xa, -q.f0, q.f0) over q.n values.
@compute @workgroup_size(WG)
fn clamp_values(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= q.n) { return; }
    xa[i] = clamp(xa[i], -q.f0, q.f0);
}

// xa *= sigmoid(xb) over q.n values.
@compute @workgroup_size(WG)
fn sigmoid_mul(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= q.n) { return; }
    xa[i] = xa[i] * (1.0 / (1.0 + exp(-xb[i])));
}

// xa[i] *= xb[i / q.d] over q.n values (a scale per row).
@compute @workgroup_size(WG)
fn scale_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= q.n) { return; }
    xa[i] = xa[i] * xb[i / q.d];
}

// Gated DeltaNet's causal depthwise conv, then SiLU, for q.n tokens of
// q.d channels (one invocation per channel, tokens in order): xa holds
// each channel's previous q.a - 1 inputs (updated), xb the inputs, xc the
// q.a weights per channel, xo the output.
@compute @workgroup_size(WG)
fn conv_step(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let ch = flat(gid, nwg);
    if (ch >= q.d) { return; }
    let kw = q.a;
    let hb = ch * (kw - 1u);
    for (var t = 0u; t < q.n; t++) {
        let xv = xb[t * q.d + ch];
        var acc = 0.0;
        for (var j = 0u; j + 1u < kw; j++) { acc += xc[ch * kw + j] * xa[hb + j]; }
        acc += xc[ch * kw + kw - 1u] * xv;
        for (var j = 0u; j + 2u < kw; j++) { xa[hb + j] = xa[hb + j + 1u]; }
        xa[hb + kw - 2u] = xv;
        xo[t * q.d + ch] = acc / (1.0 + exp(-acc));
    }
}

// Gated DeltaNet's recurrence, one workgroup per value head wid.x, tokens
// in order, each lane owning columns of the head's k_dim x v_dim state in
// xa. xb: the conv's output per token, [q (q.a heads of q.b) | k (same) |
// v (q.d heads of q.c)]; xc: [beta inputs (q.n x q.d) | decay inputs
// (same) | a_neg (q.d) | dt_bias (q.d)]; xo: q.n x (q.d x q.c) outputs.
// q.e: value head j reads key head j % q.a (else j / (q.d / q.a));
// q.f0: the query scale.
@compute @workgroup_size(WG)
fn delta_rule(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let hv = wid.x;
    let nv = q.d; let nk = q.a; let dk = q.b; let dv = q.c;
    var hk = hv / (nv / nk);
    if (q.e != 0u) { hk = hv % nk; }
    let cd = 2u * nk * dk + nv * dv;
    let so = hv * dk * dv;
    for (var t = 0u; t < q.n; t++) {
        let qo = t * cd + hk * dk;
        let ko = t * cd + nk * dk + hk * dk;
        let vo = t * cd + 2u * nk * dk + hv * dv;
        var sq = 0.0; var sk = 0.0;
        for (var i = li; i < dk; i += WG) { sq += xb[qo + i] * xb[qo + i]; sk += xb[ko + i] * xb[ko + i]; }
        let rq = 1.0 / sqrt(wsum(li, sq) + 1e-6);
        let rk = 1.0 / sqrt(wsum(li, sk) + 1e-6);
        let beta = 1.0 / (1.0 + exp(-xc[t * nv + hv]));
        let av = xc[q.n * nv + t * nv + hv] + xc[2u * q.n * nv + nv + hv];
        var sp = av;
        if (av <= 20.0) { sp = log(1.0 + exp(av)); }
        let decay = exp(xc[2u * q.n * nv + hv] * sp);
        for (var j = li; j < dv; j += WG) {
            var kv = 0.0;
            for (var i = 0u; i < dk; i++) {
                let s = xa[so + i * dv + j] * decay;
                xa[so + i * dv + j] = s;
                kv += s * (xb[ko + i] * rk);
            }
            let delta = (xb[vo + j] - kv) * beta;
            var o = 0.0;
            for (var i = 0u; i < dk; i++) {
                let s = xa[so + i * dv + j] + (xb[ko + i] * rk) * delta;
                xa[so + i * dv + j] = s;
                o += s * ((xb[qo + i] * rq) * q.f0);
            }
            xo[t * nv * dv + hv * dv + j] = o;
        }
    }
}

// Rotary embedding of token wid.y's heads in xa (q.a heads per row of q.d,
// head_dim q.b, rot_dim q.c, style q.e: 0 neox, 1 interleaved); xb and xc
// hold the token's cos and sin tables (q.c / 2 each), made on the host.
@compute @workgroup_size(WG)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let t = wid.y;
    let half = q.c / 2u;
    for (var k = li; k < q.a * half; k += WG) {
        let h = k / half; let i = k % half;
        let cs = xb[t * half + i]; let sn = xc[t * half + i];
        let base = t * q.d + h * q.b;
        var i0 = base + i; var i1 = base + i + half;
        if (q.e == 1u) { i0 = base + 2u * i; i1 = i0 + 1u; }
        let a = xa[i0]; let b = xa[i1];
        xa[i0] = a * cs - b * sn;
        xa[i1] = b * cs + a * sn;
    }
}

// Softmax of router row wid.x (q.d experts) in place, then the q.a largest
// in order (ties to the lower index) into idx.
@compute @workgroup_size(WG)
fn route(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let o = wid.x * q.d;
    var m = -3.402823e38;
    for (var i = li; i < q.d; i += WG) { m = max(m, xa[o + i]); }
    let mx = wmax(li, m);
    var s = 0.0;
    for (var i = li; i < q.d; i += WG) { let e = exp(xa[o + i] - mx); xa[o + i] = e; s += e; }
    let tot = wsum(li, s);
    for (var i = li; i < q.d; i += WG) { xa[o + i] = xa[o + i] / tot; }
    workgroupBarrier();
    // k rounds of arg-max; chosen experts are marked in idx's scratch half.
    let mark = q.n * q.a + wid.x * q.d;
    for (var i = li; i < q.d; i += WG) { idx[mark + i] = 0u; }
    workgroupBarrier();
    for (var r = 0u; r < q.a; r++) {
        var bv = -1.0; var bi = 0xffffffffu;
        for (var i = li; i < q.d; i += WG) {
            let v = xa[o + i];
            if (idx[mark + i] == 0u && (v > bv || (v == bv && i < bi))) { bv = v; bi = i; }
        }
        red[li] = bv; redi[li] = bi;
        workgroupBarrier();
        for (var h = WG / 2u; h > 0u; h = h >> 1u) {
            if (li < h) {
                let ov = red[li + h]; let oi = redi[li + h];
                if (ov > red[li] || (ov == red[li] && oi < redi[li])) { red[li] = ov; redi[li] = oi; }
            }
            workgroupBarrier();
        }
        if (li == 0u) { idx[wid.x * q.a + r] = redi[0]; idx[mark + redi[0]] = 1u; }
        workgroupBarrier();
    }
}

// The index of the largest of q.n values of xb into idx[0], as the host's
// arg-max picks it: the first of equal maxima, NaNs skipped, 0 when the
// first value is NaN.
@compute @workgroup_size(WG)
fn argmax(@builtin(local_invocation_index) li: u32) {
    let none = 0xffffffffu;
    var bv = 0.0; var bi = none;
    for (var i = li; i < q.n; i += WG) {
        let v = xb[i];
        let nan = (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
        if (!nan && (bi == none || v > bv)) { bv = v; bi = i; }
    }
    red[li] = bv; redi[li] = bi;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h = h >> 1u) {
        if (li < h) {
            let ov = red[li + h]; let oi = redi[li + h];
            if (oi != none && (redi[li] == none || ov > red[li] || (ov == red[li] && oi < redi[li]))) {
                red[li] = ov; redi[li] = oi;
            }
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        let first_nan = (bitcast<u32>(xb[0]) & 0x7fffffffu) > 0x7f800000u;
        idx[0] = select(select(redi[0], 0u, redi[0] == none), 0u, first_nan);
    }
}

// Causal attention: one workgroup per (query token wid.y, head wid.x).
// xa: q rows (q.a heads × q.b head_dim), then one sink logit per head
// (f32::MIN when the model has none), xb: K cache, xc: V cache (q.c kv
// heads), xo: output; q.n = pos0, q.e = window (0: none), q.f0 = scale,
// q.f1 = chunk size as u32 bits (0: none), q.d = keys in the cache. Scores
// live in idx reinterpreted as f32 scratch of q.d per (token, head).
@compute @workgroup_size(WG)
fn attention(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) li: u32,
             @builtin(num_workgroups) nw: vec3<u32>) {
    let h = wid.x; let t = wid.y;
    let hd = q.b;
    let kvh = h / (q.a / q.c);
    let pos = q.n + t;
    var first = 0u;
    if (q.e > 0u && pos + 1u > q.e) { first = pos + 1u - q.e; }
    let chunk = bitcast<u32>(q.f1);
    if (chunk > 0u) { first = max(first, pos / chunk * chunk); }
    let qo = t * q.a * hd + h * hd;
    let so = (t * q.a + h) * q.d;
    var m = -3.402823e38;
    for (var j = first + li; j <= pos; j += WG) {
        let ko = j * q.c * hd + kvh * hd;
        var s = 0.0;
        for (var i = 0u; i < hd; i++) { s += xa[qo + i] * xb[ko + i]; }
        s = s * q.f0;
        idx[so + j] = bitcast<u32>(s);
        m = max(m, s);
    }
    let sink = xa[nw.y * q.a * hd + h];
    let mx = max(wmax(li, m), sink);
    var tot = 0.0;
    for (var j = first + li; j <= pos; j += WG) {
        let e = exp(bitcast<f32>(idx[so + j]) - mx);
        idx[so + j] = bitcast<u32>(e);
        tot += e;
    }
    let z = wsum(li, tot) + exp(sink - mx);
    storageBarrier();
    for (var i = li; i < hd; i += WG) {
        var acc = 0.0;
        for (var j = first; j <= pos; j++) {
            acc += bitcast<f32>(idx[so + j]) * xc[j * q.c * hd + kvh * hd + i];
        }
        xo[qo + i] = acc / z;
    }
}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_rows_per_invocation_follows_the_mesa_version() {
        for (info, rows) in [
            ("Mesa 26.1.6-1~bpo13+1 (LLVM 19.1.7)", 8),
            ("Mesa 27.0.0-devel", 8),
            ("Mesa 25.0.7-2+deb13u1 (LLVM 19.1.7)", 16),
            ("Mesa 22.3.6 (LLVM 15.0.6)", 16),
            ("SwiftShader driver", 16),
            ("", 16),
        ] {
            assert_eq!(cpu_rows_per_invocation(info), rows, "{info:?}");
        }
    }
}
