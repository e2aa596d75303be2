//! An embedder's view: run one MoE layer of a fixture model with our own
//! (naive, f32) matmul, using sluice only for the expert bytes, and check
//! the result against the engine's computation of the same layer.
//!
//! `cargo run -p sluice --example moe_layer [MODEL]`

use sluice::{dequantize, Matrix, Store, StoreOptions};
use sluice_backend_cpu::CpuBackend;
use sluice_core::{ops, Backend};
use sluice_format::model::Ffn;
use sluice_format::model::Model;

/// y = W x for one token, W dequantized row by row.
fn matvec(w: Matrix<'_>, x: &[f32]) -> Vec<f32> {
    let rb = w.dtype.row_bytes(w.cols).expect("valid row");
    let mut row = vec![0f32; w.cols];
    (0..w.rows)
        .map(|r| {
            dequantize(w.dtype, &w.data[r * rb..(r + 1) * rb], &mut row).expect("row");
            row.iter().zip(x).map(|(a, b)| a * b).sum()
        })
        .collect()
}

fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/models/qwen3_moe"
        )
        .into()
    });
    let store = Store::open(
        &path,
        &StoreOptions {
            slots: Some(4),
            ..Default::default()
        },
    )?;
    let g = store.geometry().clone();
    let layer = g.moe_layers[0];
    // A hidden state and the layer's routing: here from the engine's router
    // weights; a real embedder has its own.
    let model = Model::open(&path)?;
    let Ffn::Moe(moe) = &model.layers[layer].ffn else {
        return Err("not an MoE layer".into());
    };
    let mut rng = 7u64;
    let x: Vec<f32> = (0..g.hidden)
        .map(|_| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((rng >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect();
    let backend = CpuBackend::new(Some(1))?;
    let mut probs = vec![0f32; g.experts];
    backend.matmul(moe.router.view(), &x, 1, &mut probs)?;
    ops::softmax(&mut probs);
    let mut ids: Vec<usize> = (0..g.experts).collect();
    ids.sort_by(|a, b| probs[*b].total_cmp(&probs[*a]));
    ids.truncate(g.top_k);
    ids.sort();

    // Ours: expert bytes from sluice, our own matmul.
    let experts = store.experts(layer, &ids)?;
    let mut ours = vec![0f32; g.hidden];
    for e in &experts {
        let gate = matvec(e.gate(), &x);
        let up = matvec(e.up(), &x);
        let act: Vec<f32> = gate.iter().zip(&up).map(|(a, b)| silu(*a) * b).collect();
        let y = matvec(e.down(), &act);
        let w = probs[e.id()];
        ours.iter_mut().zip(&y).for_each(|(o, v)| *o += w * v);
    }
    // The engine's: the same experts through its backend and weights.
    let mut theirs = vec![0f32; g.hidden];
    for &id in &ids {
        let m = &moe.experts[id];
        let n = m.gate.rows;
        let (mut gt, mut up, mut y) = (vec![0f32; n], vec![0f32; n], vec![0f32; g.hidden]);
        backend.matmul(m.gate.view(), &x, 1, &mut gt)?;
        backend.matmul(m.up.view(), &x, 1, &mut up)?;
        ops::swiglu(&mut gt, &up);
        backend.matmul(m.down.view(), &gt, 1, &mut y)?;
        theirs
            .iter_mut()
            .zip(&y)
            .for_each(|(o, v)| *o += probs[id] * v);
    }
    let max = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = ours
        .iter()
        .zip(&theirs)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    println!(
        "layer {layer}, experts {ids:?}: max |ours - engine| = {err:.3e} (max |y| = {max:.3e}); {} bytes streamed",
        store.stats().bytes_read
    );
    if err > 1e-4 * max.max(1e-6) {
        return Err(format!("mismatch: {err} > 1e-4 × {max}").into());
    }
    Ok(())
}
