//! Read plans: where each routed expert's bytes lie in the model's files,
//! merged into as few reads as the layout allows, and where each matrix
//! lands in a slot once they are in.

use sluice_core::{DType, Error, Result};
use sluice_format::model::{Ffn, Model, Weight};
use sluice_format::packed::PackInfo;
use sluice_io::FileId;

/// One read of an expert's plan.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seg {
    pub file: FileId,
    pub offset: u64,
    pub len: usize,
    /// Start of this read's destination within the slot.
    pub dst: usize,
}

/// Where a byte range of an expert lies once its reads are in.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Loc {
    pub seg: usize,
    pub rel: usize,
    pub len: usize,
}

/// Where one matrix of an expert lies once its reads are in.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat {
    pub main: Loc,
    /// Separate scales and biases (MLX), or scale grid lines (FP8).
    pub aux: [Option<Loc>; 2],
    /// FP8: the first row's position in its block of rows.
    pub block_row0: usize,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
}

/// The reads of one expert and where its matrices land.
#[derive(Clone, Debug)]
pub(crate) struct ExpertPlan {
    pub segs: Vec<Seg>,
    pub mats: [Mat; 3],
    pub checksum: Option<u64>,
}

/// Every routed expert's plan.
pub(crate) struct Plans {
    /// Per layer (None for dense layers), per expert.
    pub layers: Vec<Option<Vec<ExpertPlan>>>,
    /// Bytes of the largest plan: one slot.
    pub max_plan: usize,
    /// Rows of the widest expert (scratch sizing).
    pub inter: usize,
    pub experts_total: usize,
}

impl Plans {
    /// Plans every routed expert of `model`, whose files are open in the
    /// engine as `file_ids`, for reads aligned to `align`.
    pub fn new(model: &Model, file_ids: &[FileId], align: usize) -> Result<Plans> {
        let pack = PackInfo::of(&model.files)?;
        let mut layers = Vec::with_capacity(model.layers.len());
        let (mut moe_index, mut max_plan, mut inter, mut experts_total) = (0, 0usize, 0usize, 0);
        for l in &model.layers {
            let Ffn::Moe(m) = &l.ffn else {
                layers.push(None);
                continue;
            };
            let mut ps = Vec::with_capacity(m.experts.len());
            for (e, x) in m.experts.iter().enumerate() {
                let parts = [&x.gate, &x.up, &x.down].map(|w| w.parts());
                if parts.iter().flatten().any(|(_, d)| !d.is_mapped()) {
                    return Err(Error::Unsupported(format!(
                        "streaming layer {} expert {e}: its weights were rearranged in memory at load (the file stores them transposed, as Llama 4's and gpt-oss's float safetensors do, or in another block layout, as gpt-oss's MXFP4 ones), so they are not a range of the file to read; convert the model to GGUF first (`sluice pack`, or llama.cpp's convert_hf_to_gguf.py)",
                        layers.len()
                    )));
                }
                inter = inter.max(x.gate.rows);
                let gap = pack.as_ref().map_or(4096, |p| p.align.max(4096));
                let (segs, mats) = merge_plan([&x.gate, &x.up, &x.down], file_ids, align, gap);
                max_plan = max_plan.max(plan_bytes(&segs, align));
                let checksum = match &pack {
                    Some(p) if segs.len() == 1 => {
                        p.checksums.get(moe_index * m.experts.len() + e).copied()
                    }
                    _ => None,
                };
                ps.push(ExpertPlan {
                    segs,
                    mats,
                    checksum,
                });
            }
            experts_total += ps.len();
            moe_index += 1;
            layers.push(Some(ps));
        }
        if let Some(p) = &pack {
            if !p.checksums.is_empty() && p.checksums.len() != experts_total {
                return Err(Error::Format {
                    path: model.files.path.clone(),
                    format: "packed",
                    msg: format!(
                        "the manifest has {} record checksums for {experts_total} experts",
                        p.checksums.len()
                    ),
                });
            }
        }
        Ok(Plans {
            layers,
            max_plan,
            inter,
            experts_total,
        })
    }

    /// Whether any record carries a checksum to verify.
    pub fn has_checksums(&self) -> bool {
        self.layers
            .iter()
            .flatten()
            .flatten()
            .any(|p| p.checksum.is_some())
    }

    pub fn get(&self, layer: usize, e: usize) -> &ExpertPlan {
        &self.layers[layer].as_ref().expect("MoE layer")[e]
    }
}

/// The reads of one expert: its matrices' byte ranges (values, and MLX
/// scales and biases) in file order, neighbours within `gap` bytes merged
/// into one read (a packed record's tensors are padded to its alignment).
fn merge_plan(
    w: [&Weight; 3],
    file_ids: &[FileId],
    align: usize,
    gap: u64,
) -> (Vec<Seg>, [Mat; 3]) {
    // (matrix, part, file, offset, length)
    let mut ranges: Vec<(usize, usize, usize, u64, usize)> = Vec::with_capacity(9);
    for (i, wi) in w.iter().enumerate() {
        for (pi, (file, data)) in wi.parts().into_iter().enumerate() {
            ranges.push((i, pi, file, data.offset() as u64, data.len()));
        }
    }
    ranges.sort_by_key(|r| (r.2, r.3));
    let mut segs: Vec<Seg> = Vec::with_capacity(3);
    let mut at = [[Loc::default(); 3]; 3];
    for &(i, pi, file, off, len) in &ranges {
        let fid = file_ids[file];
        let loc = match segs.last_mut() {
            // Adjacent or nearly: one read, a few wasted bytes.
            Some(s)
                if s.file == fid
                    && off >= s.offset
                    && off.saturating_sub(s.offset + s.len as u64) <= gap =>
            {
                let rel = (off - s.offset) as usize;
                s.len = s.len.max(rel + len);
                Loc {
                    seg: segs.len() - 1,
                    rel,
                    len,
                }
            }
            _ => {
                segs.push(Seg {
                    file: fid,
                    offset: off,
                    len,
                    dst: 0,
                });
                Loc {
                    seg: segs.len() - 1,
                    rel: 0,
                    len,
                }
            }
        };
        at[i][pi] = loc;
    }
    let mut dst = 0;
    for s in &mut segs {
        s.dst = dst;
        dst += sluice_io::max_widened_len(s.len, align).next_multiple_of(align.max(64));
    }
    let mat = |i: usize| Mat {
        main: at[i][0],
        aux: [1, 2].map(|p| (p <= w[i].aux.len()).then_some(at[i][p])),
        block_row0: w[i].block_row0,
        dtype: w[i].dtype,
        rows: w[i].rows,
        cols: w[i].cols,
    };
    (segs, [mat(0), mat(1), mat(2)])
}

fn plan_bytes(segs: &[Seg], align: usize) -> usize {
    segs.last().map_or(0, |s| {
        s.dst + sluice_io::max_widened_len(s.len, align).next_multiple_of(align.max(64))
    })
}
