//! The packed layout: a GGUF file laid out for streaming.
//!
//! Dense weights come first, in their own region. Then, layer by layer,
//! each expert is one record: its gate, up and down matrices back to back,
//! each on an `align` boundary (4 KiB by default, 16 KiB for Apple storage),
//! which is also the file's `general.alignment`, so one expert is one
//! aligned read and every tensor sits where GGUF readers (llama.cpp's
//! included) expect it. The manifest is the GGUF header itself: per-expert
//! tensors `blk.L.ffn_{gate,up,down}.E.weight` give each record's offset,
//! size and quant type, `sluice.*` keys add the normalized config, the
//! tokenizer, the alignment and one xxh3-64 checksum per record, and the
//! architecture's standard keys and a vocabulary (`gguf_meta.rs`) describe
//! the model to other readers. llama.cpp reads experts only stacked per
//! layer (`ffn_gate_exps`), so it loads the `--stacked` layout and refuses
//! the per-expert records by the missing stacked tensor's name.
//!
//! Packing reads the source with `pread` one record at a time, so it never
//! holds more than a record (or one dense tensor) in memory.

use crate::config::{Arch, Config, PACKED_CONFIG_KEY};
use crate::gguf_meta::{self, FfnSizes};
use crate::model::{Ffn, LatentKv, MixerWeights, Model, PairProj, Weight};
use crate::tokenizer::PACKED_TOKENIZER_KEY;
use sluice_core::{quant, DType, Error, Result};
use sluice_format::{GgufWriter, MetaValue, ModelFiles, TensorSpec};
use std::path::Path;
use xxhash_rust::xxh3::xxh3_64;

pub use sluice_format::packed::{keys, PackInfo};

/// Options of [`pack`].
#[derive(Clone, Debug)]
pub struct PackOptions {
    /// Record alignment (a power of two ≥ 4096).
    pub align: u64,
    /// Re-quantize expert matrices to this type (changes the model's output).
    pub expert_quant: Option<DType>,
    /// Stack each layer's experts in three tensors (`ffn_{gate,up,down}_exps`,
    /// llama.cpp's layout, which it loads) instead of one record per expert.
    pub stacked: bool,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            align: 4096,
            expert_quant: None,
            stacked: false,
        }
    }
}

/// What was written.
#[derive(Clone, Debug, Default)]
pub struct PackSummary {
    /// Size of the output file.
    pub file_bytes: u64,
    /// Bytes of dense tensors.
    pub dense_bytes: u64,
    /// Expert records written.
    pub records: u64,
    /// Bytes of one record of the first MoE layer (padding excluded).
    pub record_bytes: u64,
    /// Bytes of all expert matrices.
    pub expert_bytes: u64,
}

/// Where a tensor's bytes come from.
pub(crate) enum Src<'a> {
    /// A weight of an opened model (read with pread when mapped).
    Weight(&'a Weight),
    /// f32 values (norms, biases).
    F32(&'a [f32]),
    /// One f32 value repeated.
    Const(f32),
    /// Pseudo-random values of order `scale` (synthetic models).
    Random { seed: u64, scale: f32 },
    /// Weights of the same shape and type, back to back (stacked experts).
    Stack(Vec<&'a Weight>),
}

pub(crate) struct Item<'a> {
    pub spec: TensorSpec,
    pub src: Src<'a>,
    /// Re-quantize from the source's type to `spec.dtype`.
    pub convert: bool,
}

/// A model's tensors in packed order: dense ones, then per MoE layer the
/// records of its experts (three items each).
pub(crate) struct Plan<'a> {
    pub config: &'a Config,
    pub dense: Vec<Item<'a>>,
    pub experts: Vec<Vec<[Item<'a>; 3]>>,
    pub tokenizer: Option<String>,
    pub source: String,
    /// Record alignment, which is also the file's `general.alignment`.
    pub align: u64,
    pub expert_quant: Option<DType>,
    /// Standard keys for other readers (hyper-parameters, vocabulary).
    pub meta: Vec<(String, MetaValue)>,
}

/// The GGUF `general.architecture` of each architecture.
pub(crate) fn gguf_arch(a: Arch) -> &'static str {
    match a {
        Arch::Qwen3Moe => "qwen3moe",
        Arch::Qwen2Moe => "qwen2moe",
        Arch::Mixtral => "llama",
        Arch::Olmoe => "olmoe",
        Arch::Qwen35Moe => "qwen35moe",
        Arch::DeepseekV3 => "deepseek2",
        Arch::Glm4Moe => "glm4moe",
        Arch::Qwen3Next => "qwen3next",
        Arch::Llama4 => "llama4",
        Arch::GptOss => "gpt-oss",
    }
}

/// llama.cpp's `rope_freqs.weight`: Llama 3's rope scaling, one divisor
/// per rotated pair.
pub(crate) fn rope_freqs(factors: &[f32]) -> Item<'_> {
    Item {
        spec: spec(
            "rope_freqs.weight".into(),
            DType::F32,
            vec![factors.len()],
            0,
        ),
        src: Src::F32(factors),
        convert: false,
    }
}

pub(crate) fn spec(name: String, dtype: DType, shape: Vec<usize>, align: u64) -> TensorSpec {
    TensorSpec {
        name,
        dtype,
        shape,
        align,
    }
}

/// Rewrites `model` into the packed layout at `out`. `progress` is called
/// with (bytes written, bytes total).
pub fn pack(
    model: &Model,
    tokenizer_json: Option<String>,
    out: &Path,
    opts: &PackOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PackSummary> {
    if !opts.align.is_power_of_two() || opts.align < 4096 {
        return Err(Error::Invalid(format!(
            "record alignment {} is not a power of two ≥ 4096",
            opts.align
        )));
    }
    if let Some(q) = opts.expert_quant {
        if !quant::QUANTIZE_TARGETS.contains(&q) {
            return Err(Error::Unsupported(format!(
                "re-quantizing experts to {q:?} (supported: f32, f16, bf16, q8_0, q4_0)"
            )));
        }
    }
    let c = &model.config;
    fn w<'a>(name: String, w: &'a Weight) -> Item<'a> {
        Item {
            spec: spec(name, w.dtype, vec![w.rows, w.cols], 0),
            src: Src::Weight(w),
            convert: false,
        }
    }
    fn v<'a>(name: String, x: &'a [f32]) -> Item<'a> {
        Item {
            spec: spec(name, DType::F32, vec![x.len()], 0),
            src: Src::F32(x),
            convert: false,
        }
    }
    let mut dense = vec![w("token_embd.weight".into(), &model.embed)];
    let mut experts = Vec::new();
    for (i, l) in model.layers.iter().enumerate() {
        let b = format!("blk.{i}.");
        dense.push(v(format!("{b}attn_norm.weight"), &l.attn_norm));
        match &l.mixer {
            MixerWeights::Attention(a) => {
                for (n, lin) in [("q", &a.q), ("k", &a.k), ("v", &a.v), ("output", &a.o)] {
                    dense.push(w(format!("{b}attn_{n}.weight"), &lin.w));
                    if let Some(bias) = &lin.bias {
                        dense.push(v(format!("{b}attn_{n}.bias"), bias));
                    }
                }
                if let Some(x) = &a.q_norm {
                    dense.push(v(format!("{b}attn_q_norm.weight"), x));
                }
                if let Some(x) = &a.k_norm {
                    dense.push(v(format!("{b}attn_k_norm.weight"), x));
                }
                if let Some(x) = &a.sinks {
                    dense.push(v(format!("{b}attn_sinks.weight"), x));
                }
            }
            MixerWeights::Latent(a) => {
                if let Some((qa, norm)) = &a.q_a {
                    dense.push(w(format!("{b}attn_q_a.weight"), qa));
                    dense.push(v(format!("{b}attn_q_a_norm.weight"), norm));
                    dense.push(w(format!("{b}attn_q_b.weight"), &a.q));
                } else {
                    dense.push(w(format!("{b}attn_q.weight"), &a.q));
                }
                dense.push(w(format!("{b}attn_kv_a_mqa.weight"), &a.kv_a));
                dense.push(v(format!("{b}attn_kv_a_norm.weight"), &a.kv_a_norm));
                match &a.kv_b {
                    LatentKv::Joint(x) => dense.push(w(format!("{b}attn_kv_b.weight"), x)),
                    LatentKv::Split { k_t, v: vb } => {
                        dense.push(w(format!("{b}attn_k_b.weight"), k_t));
                        dense.push(w(format!("{b}attn_v_b.weight"), vb));
                    }
                }
                dense.push(w(format!("{b}attn_output.weight"), &a.o));
            }
            MixerWeights::DeltaNet(d) => {
                // Grouped projections keep llama.cpp's names for them.
                match &d.qkvz {
                    PairProj::Split(qkv, z) => {
                        dense.push(w(format!("{b}attn_qkv.weight"), qkv));
                        dense.push(w(format!("{b}attn_gate.weight"), z));
                    }
                    PairProj::Grouped(x) => dense.push(w(format!("{b}ssm_in.weight"), x)),
                }
                match &d.ba {
                    PairProj::Split(beta, alpha) => {
                        dense.push(w(format!("{b}ssm_beta.weight"), beta));
                        dense.push(w(format!("{b}ssm_alpha.weight"), alpha));
                    }
                    PairProj::Grouped(x) => dense.push(w(format!("{b}ssm_ba.weight"), x)),
                }
                let mut conv = v(format!("{b}ssm_conv1d.weight"), &d.conv);
                let cd = c.linear.map_or(1, |l| l.conv_dim());
                conv.spec.shape = vec![cd, d.conv.len() / cd];
                dense.push(conv);
                dense.push(v(format!("{b}ssm_dt.bias"), &d.dt_bias));
                dense.push(v(format!("{b}ssm_a"), &d.a_neg));
                dense.push(v(format!("{b}ssm_norm.weight"), &d.norm));
                dense.push(w(format!("{b}ssm_out.weight"), &d.out));
            }
        }
        let ffn_norm = if c.arch.is_hybrid() || matches!(c.arch, Arch::Glm4Moe | Arch::GptOss) {
            "post_attention_norm"
        } else {
            "ffn_norm"
        };
        dense.push(v(format!("{b}{ffn_norm}.weight"), &l.ffn_norm));
        match &l.ffn {
            Ffn::Dense(m) => {
                dense.push(w(format!("{b}ffn_gate.weight"), &m.gate));
                dense.push(w(format!("{b}ffn_up.weight"), &m.up));
                dense.push(w(format!("{b}ffn_down.weight"), &m.down));
            }
            Ffn::Moe(m) => {
                dense.push(w(format!("{b}ffn_gate_inp.weight"), &m.router));
                if let Some(x) = &m.score_bias {
                    dense.push(v(format!("{b}exp_probs_b.bias"), x));
                }
                if let Some(x) = &m.router_bias {
                    dense.push(v(format!("{b}ffn_gate_inp.bias"), x));
                }
                if let Some(x) = &m.biases {
                    // Resident beside the router, `[E, rows]` as llama.cpp's.
                    for (n, vals) in [("gate", &x.gate), ("up", &x.up), ("down", &x.down)] {
                        let mut it = v(format!("{b}ffn_{n}_exps.bias"), vals);
                        it.spec.shape = vec![x.experts, vals.len() / x.experts];
                        dense.push(it);
                    }
                }
                if let Some(s) = &m.shared {
                    dense.push(w(format!("{b}ffn_gate_shexp.weight"), &s.gate));
                    dense.push(w(format!("{b}ffn_up_shexp.weight"), &s.up));
                    dense.push(w(format!("{b}ffn_down_shexp.weight"), &s.down));
                }
                if let Some(g) = &m.shared_gate {
                    let mut it = w(format!("{b}ffn_gate_inp_shexp.weight"), g);
                    it.spec.shape = vec![g.cols];
                    dense.push(it);
                }
                if opts.stacked {
                    let ne = m.experts.len();
                    for (n, pick) in [
                        ("gate", (|x| &x.gate) as fn(&crate::model::Mlp) -> &Weight),
                        ("up", |x| &x.up),
                        ("down", |x| &x.down),
                    ] {
                        let ws: Vec<&Weight> = m.experts.iter().map(pick).collect();
                        let first = ws[0];
                        let dt = opts.expert_quant.unwrap_or(first.dtype);
                        dense.push(Item {
                            spec: spec(
                                format!("{b}ffn_{n}_exps.weight"),
                                dt,
                                vec![ne, first.rows, first.cols],
                                0,
                            ),
                            convert: dt != first.dtype,
                            src: Src::Stack(ws),
                        });
                    }
                    continue;
                }
                let recs = m
                    .experts
                    .iter()
                    .enumerate()
                    .map(|(e, x)| {
                        let mut r = [
                            w(format!("{b}ffn_gate.{e}.weight"), &x.gate),
                            w(format!("{b}ffn_up.{e}.weight"), &x.up),
                            w(format!("{b}ffn_down.{e}.weight"), &x.down),
                        ];
                        r[0].spec.align = opts.align;
                        if let Some(q) = opts.expert_quant {
                            for it in &mut r {
                                it.convert = it.spec.dtype != q;
                                it.spec.dtype = q;
                            }
                        }
                        r
                    })
                    .collect();
                experts.push(recs);
            }
        }
    }
    dense.push(v("output_norm.weight".into(), &model.norm));
    if !c.tie_embeddings {
        dense.push(w("output.weight".into(), &model.lm_head));
    }
    if let Some(f) = &c.rope_factors {
        dense.push(rope_freqs(f));
    }
    // Types whose scales are separate tensors have no GGUF type: any
    // weight the file would hold.
    let found = dense
        .iter()
        .chain(experts.iter().flatten().flatten())
        .flat_map(|it| match &it.src {
            Src::Weight(w) => vec![w.dtype],
            Src::Stack(ws) => ws.iter().map(|w| w.dtype).collect(),
            _ => Vec::new(),
        })
        .find(|d| d.has_aux());
    match found {
        Some(DType::Mlx(_)) => {
            return Err(Error::Unsupported(
                "packing MLX-quantized weights: GGUF has no MLX types (sluice streams MLX files in place)"
                    .into(),
            ))
        }
        Some(t) => {
            return Err(Error::Unsupported(format!(
                "packing {t} weights: GGUF has no block-scaled FP8 type (sluice streams FP8 safetensors in place; llama.cpp's convert_hf_to_gguf.py dequantizes them to a GGUF type)"
            )))
        }
        None => {}
    }
    let source = model.files.path.display().to_string();
    let mut meta = gguf_meta::hparams(c, ffn_sizes(model), &source);
    let vocab = match (model.files.gguf(), &tokenizer_json) {
        (Some(g), _) if g.get("tokenizer.ggml.model").is_some() => gguf_meta::copy_tokenizer(g),
        (_, Some(j)) => {
            gguf_meta::from_tokenizer_json(j, c.vocab, c.eos.first().copied()).unwrap_or_default()
        }
        _ => Vec::new(),
    };
    meta.extend(vocab);
    let plan = Plan {
        config: c,
        dense,
        experts,
        tokenizer: tokenizer_json,
        source,
        align: opts.align,
        expert_quant: opts.expert_quant,
        meta,
    };
    write(&plan, Some(&model.files), out, progress)
}

/// The feed-forward widths of a loaded model, from its weights.
fn ffn_sizes(model: &Model) -> FfnSizes {
    let mut f = FfnSizes::default();
    for l in &model.layers {
        match &l.ffn {
            Ffn::Dense(d) if f.dense == 0 => f.dense = d.gate.rows,
            Ffn::Moe(m) => {
                if f.expert == 0 {
                    f.expert = m.experts.first().map_or(0, |e| e.gate.rows);
                }
                if f.shared.is_none() {
                    f.shared = m.shared.as_ref().map(|s| s.gate.rows);
                }
            }
            _ => {}
        }
    }
    f
}

/// Writes a plan. `files` resolves `Src::Weight` sources.
pub(crate) fn write(
    plan: &Plan,
    files: Option<&ModelFiles>,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PackSummary> {
    let n_records: usize = plan.experts.iter().map(Vec::len).sum();
    let mut meta = vec![
        (
            "general.architecture".to_string(),
            MetaValue::Str(gguf_arch(plan.config.arch).into()),
        ),
        (keys::VERSION.into(), MetaValue::U32(1)),
        (keys::ALIGN.into(), MetaValue::U64(plan.align)),
        (keys::CHECKSUM.into(), MetaValue::Str("xxh3-64".into())),
        (keys::SOURCE.into(), MetaValue::Str(plan.source.clone())),
        (
            PACKED_CONFIG_KEY.into(),
            MetaValue::Str(plan.config.to_json().to_string()),
        ),
    ];
    if let Some(q) = plan.expert_quant {
        meta.push((keys::EXPERT_QUANT.into(), MetaValue::Str(format!("{q:?}"))));
    }
    if let Some(t) = &plan.tokenizer {
        meta.push((PACKED_TOKENIZER_KEY.into(), MetaValue::Str(t.clone())));
    }
    meta.extend(plan.meta.iter().cloned());
    // Checksums are known only once the records are written: the array
    // has a fixed size, so it is patched in place at the end.
    let sums_index = meta.len();
    meta.push((keys::CHECKSUMS.into(), MetaValue::U64s(vec![0; n_records])));
    let mut specs: Vec<TensorSpec> = plan.dense.iter().map(|i| i.spec.clone()).collect();
    for layer in &plan.experts {
        for rec in layer {
            specs.extend(rec.iter().map(|i| i.spec.clone()));
        }
    }
    let (mut wr, offsets) = GgufWriter::create(out, &meta, &specs, plan.align)?;
    let total: u64 = offsets.last().copied().unwrap_or(0)
        + specs
            .last()
            .map(|s| s.dtype.tensor_bytes(&s.shape).unwrap_or(0) as u64)
            .unwrap_or(0);
    let mut summary = PackSummary::default();
    let n_files = files.map_or(0, |f| f.files().len());
    let mut readers: Vec<Option<std::fs::File>> = (0..n_files).map(|_| None).collect();
    let mut buf = Vec::new();
    for it in &plan.dense {
        fill(it, files, &mut readers, &mut buf)?;
        summary.dense_bytes += buf.len() as u64;
        wr.write_tensor(&buf)?;
        progress(wr.position(), total);
    }
    let mut sums = Vec::with_capacity(n_records);
    let mut rec = Vec::new();
    let mut ti = plan.dense.len();
    for layer in &plan.experts {
        for r in layer {
            rec.clear();
            let start = offsets[ti];
            for it in r.iter() {
                fill(it, files, &mut readers, &mut buf)?;
                // The padding between a record's tensors is part of the
                // record as read, so it is hashed too.
                rec.resize((offsets[ti] - start) as usize, 0);
                ti += 1;
                rec.extend_from_slice(&buf);
                wr.write_tensor(&buf)?;
                summary.expert_bytes += buf.len() as u64;
            }
            if summary.record_bytes == 0 {
                summary.record_bytes = rec.len() as u64;
            }
            sums.push(xxh3_64(&rec));
            summary.records += 1;
            progress(wr.position(), total);
        }
    }
    wr.patch_u64s(sums_index, &sums)?;
    summary.file_bytes = wr.finish()?;
    Ok(summary)
}

/// The bytes of one item in its target type, into `buf`.
fn fill(
    it: &Item,
    files: Option<&ModelFiles>,
    readers: &mut [Option<std::fs::File>],
    buf: &mut Vec<u8>,
) -> Result<()> {
    buf.clear();
    match &it.src {
        Src::F32(x) => buf.extend(x.iter().flat_map(|v| v.to_le_bytes())),
        Src::Const(v) => {
            let n: usize = it.spec.shape.iter().product();
            buf.extend(std::iter::repeat_n(v.to_le_bytes(), n).flatten());
        }
        Src::Random { seed, scale } => {
            buf.resize(it.spec.dtype.tensor_bytes(&it.spec.shape)?, 0);
            quant::fill_random_tensor(it.spec.dtype, buf, *seed, *scale);
        }
        Src::Stack(ws) => {
            let mut one = Vec::new();
            for w in ws {
                let item = Item {
                    spec: spec(String::new(), it.spec.dtype, vec![w.rows, w.cols], 0),
                    src: Src::Weight(w),
                    convert: it.convert,
                };
                fill(&item, files, readers, &mut one)?;
                buf.extend_from_slice(&one);
            }
        }
        Src::Weight(w) => {
            buf.resize(w.data.len(), 0);
            if w.data.is_mapped() {
                let files = files
                    .ok_or_else(|| Error::Invalid("a file-backed weight without files".into()))?;
                let f = &files.files()[w.file];
                let r = match &mut readers[w.file] {
                    Some(r) => r,
                    slot => slot
                        .insert(std::fs::File::open(&f.path).map_err(|e| Error::io(&f.path, e))?),
                };
                sluice_format::read_exact_at(r, buf, w.data.offset() as u64)
                    .map_err(|e| Error::io(&f.path, e))?;
            } else {
                buf.copy_from_slice(&w.data);
            }
            if it.convert {
                let mut x = vec![0f32; w.rows * w.cols];
                quant::dequantize(w.dtype, buf, &mut x)?;
                buf.clear();
                quant::quantize(it.spec.dtype, &x, buf)
                    .map_err(|e| Error::Invalid(format!("{}: {e}", it.spec.name)))?;
            }
        }
    }
    Ok(())
}
