//! The streaming engine on a failing drive (`sluice_io::fault`): an error
//! names the layer and expert, or the logits are bit-identical to the
//! resident run; never anything in between. A slot whose reads failed is
//! emptied, never kept as if valid, so a later run reads it again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sluice_backend_cpu::CpuBackend;
use sluice_core::Error;
use sluice_engine::stream::{EngineWrap, StreamOptions, Streamer};
use sluice_engine::{Model, Session};
use sluice_io::fault::{self, FaultPlan, Faults};
use sluice_io::{EngineOptions, IoKind, ReadEngine};

const TOKENS: [u32; 9] = [261, 267, 270, 276, 262, 274, 16, 262, 269];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

fn backend() -> Arc<CpuBackend> {
    Arc::new(CpuBackend::new(Some(1)).unwrap())
}

fn resident(path: &Path) -> Vec<f32> {
    let m = Arc::new(Model::open(path).unwrap());
    Session::new(m, backend()).forward(&TOKENS, true).unwrap()
}

/// A streaming session whose read engine is `fault::open_engine(io,
/// faults)`. The wrap hook discards the plain engine the streamer opened:
/// faults below the trait (short reads, io_uring refusal) need the engine
/// to be opened by the fault module. Faults are disarmed while the dense
/// weights are read and armed once the streamer is ready.
fn faulty_session(
    path: &Path,
    io: IoKind,
    faults: &Faults,
    slots: usize,
    read_chunk: usize,
) -> Session {
    let mut model = Model::open(path).unwrap();
    let engine_opts = EngineOptions {
        kind: io,
        queue_depth: 8,
        threads: 2,
        ..EngineOptions::default()
    };
    let (f, o) = (faults.clone(), engine_opts.clone());
    let opts = StreamOptions {
        io: engine_opts,
        slots: Some(slots),
        ctx: 64,
        batch: 16,
        read_chunk,
        prefetch: sluice_stream::Prefetch::Xlayer,
        engine_wrap: Some(EngineWrap(Arc::new(move |_plain| {
            fault::open_engine(&o, &f).expect("opening the faulty engine") as Box<dyn ReadEngine>
        }))),
        ..StreamOptions::default()
    };
    faults.arm(false);
    let streamer = Streamer::open(&mut model, &opts).unwrap();
    faults.arm(true);
    Session::streaming(Arc::new(model), backend(), streamer, 64)
}

/// Every expert read fails: the forward pass returns an error naming the
/// layer, the expert and the OS error, not logits; once the drive recovers
/// the same session gives the resident logits.
#[test]
fn persistent_eio_names_the_layer_and_expert() {
    let m = fixture("qwen2_moe.q4_0.gguf");
    let want = resident(&m);
    for io in [IoKind::Uring, IoKind::Pread] {
        let faults = Faults::new(FaultPlan {
            seed: 1,
            eio: 1.0,
            ..FaultPlan::default()
        });
        let mut s = faulty_session(&m, io, &faults, 4, 0);
        let err = s.forward(&TOKENS, true).unwrap_err().to_string();
        assert!(
            err.contains("reading layer ")
                && err.contains(" expert ")
                && err.contains("Input/output error")
                && err.contains("qwen2_moe.q4_0.gguf"),
            "{err}"
        );
        faults.arm(false);
        s.reset();
        let got = s.forward(&TOKENS, true).unwrap();
        assert!(got == want, "{io:?}: logits after recovery differ");
    }
}

/// Random EIO, short reads, delays and torn completions: each run either
/// fails naming a layer and expert or gives exactly the resident logits;
/// once the drive recovers, every run gives the resident logits. Reads are
/// split into 16 KiB chunks, so that one read of an expert can fail while
/// the others land (a half-filled slot). With 64 slots every expert stays
/// resident, so a failed slot wrongly kept as valid would be hit by the
/// later runs; with 8 slots experts are evicted and re-read in every run.
#[test]
fn transient_faults_give_an_error_or_the_right_logits() {
    for (name, io) in [
        ("qwen2_moe.q4_0.gguf", IoKind::Uring),
        ("qwen3_moe", IoKind::Pread),
    ] {
        let m = fixture(name);
        let want = resident(&m);
        // With 64 slots only misses read (the first run, then what failed),
        // so failures must be frequent to be seen at all.
        for (slots, eio) in [(64, 0.3), (8, 0.05)] {
            let faults = Faults::new(FaultPlan {
                seed: 7,
                eio,
                short: 0.3,
                delay: 0.2,
                max_delay: Duration::from_micros(500),
                torn: 0.01,
                refuse_uring: false,
            });
            let mut s = faulty_session(&m, io, &faults, slots, 16 << 10);
            let (mut ok, mut failed) = (0, 0);
            for run in 0..20 {
                // The last runs on a drive that has recovered.
                faults.arm(run < 16);
                s.reset();
                match s.forward(&TOKENS, true) {
                    Ok(got) => {
                        assert!(
                            got == want,
                            "{name}, {slots} slots, run {run}: wrong logits"
                        );
                        ok += 1;
                    }
                    Err(e) => {
                        let e = e.to_string();
                        assert!(run < 16, "{name}: {e} without faults");
                        assert!(
                            e.contains("reading layer ") && e.contains(" expert "),
                            "{e}"
                        );
                        failed += 1;
                    }
                }
            }
            let n = faults.counts();
            eprintln!("{name}, {slots} slots: {ok} runs ok, {failed} failed; injected {n:?}");
            assert!(failed > 0, "{name}, {slots} slots: no run failed");
            assert!(n.short > 0 && n.delayed > 0, "{n:?}");
        }
    }
}

/// An engine reporting success for part of a read (torn completion) fails
/// the expert instead of computing with a half-filled slot.
#[test]
fn torn_completion_is_an_error_not_logits() {
    let m = fixture("qwen2_moe.q4_0.gguf");
    let faults = Faults::new(FaultPlan {
        torn: 1.0,
        ..FaultPlan::default()
    });
    let mut s = faulty_session(&m, IoKind::Pread, &faults, 4, 0);
    let err = s.forward(&TOKENS, true).unwrap_err();
    // Typed, for embedders: which expert, and that the read came back short.
    assert!(
        matches!(&err, Error::ExpertRead { cause, .. } if matches!(**cause, Error::ShortRead { got, wanted } if got < wanted)),
        "{err:?}"
    );
    let err = err.to_string();
    assert!(
        err.contains("reading layer ") && err.contains("reported success after"),
        "{err}"
    );
}

/// io_uring refused at setup: the streamer runs on the pread pool, its
/// notes carry the reason, and the logits are the resident ones.
#[test]
fn io_uring_refusal_falls_back_to_pread_in_the_streamer() {
    let m = fixture("qwen3_moe");
    let faults = Faults::new(FaultPlan {
        refuse_uring: true,
        ..FaultPlan::default()
    });
    let mut s = faulty_session(&m, IoKind::Uring, &faults, 3, 0);
    let st = s.streamer().unwrap();
    assert!(st
        .engine_description()
        .starts_with("pread pool (io_uring refused)"));
    let notes = st.notes().join("; ");
    assert!(
        notes.contains("io_uring refused (io_uring_setup: Operation not permitted"),
        "{notes}"
    );
    assert!(s.forward(&TOKENS, true).unwrap() == resident(&m));
}

/// `--verify`: one flipped byte in one expert's record of a packed file is
/// named by layer and expert when that expert is read; its neighbours read
/// fine, and the corrupt record is never kept as a valid slot.
#[test]
fn checksum_mismatch_names_the_layer_and_expert() {
    let src = fixture("qwen2_moe.q4_0.gguf");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("engine-faults");
    std::fs::create_dir_all(&dir).unwrap();
    let packed = dir.join(format!("packed-{}.gguf", std::process::id()));
    let model = Model::open(&src).unwrap();
    sluice_engine::pack::pack(&model, None, &packed, &Default::default(), &mut |_, _| {}).unwrap();
    let files = sluice_format::ModelFiles::open(&packed).unwrap();
    let (layer, expert) = (
        (0..model.config.n_layers)
            .filter(|&l| model.config.moe_layers[l])
            .nth(1)
            .unwrap(),
        5,
    );
    let t = files
        .tensor(&format!("blk.{layer}.ffn_down.{expert}.weight"))
        .unwrap();
    let at = (t.offset + t.nbytes / 2) as usize;
    drop(files);
    let mut bytes = std::fs::read(&packed).unwrap();
    bytes[at] ^= 0x01;
    std::fs::write(&packed, &bytes).unwrap();

    let mut m = Model::open(&packed).unwrap();
    let mut st = Streamer::open(
        &mut m,
        &StreamOptions {
            io: EngineOptions {
                kind: IoKind::Pread,
                ..EngineOptions::default()
            },
            slots: Some(4),
            verify: true,
            dense: false,
            ..StreamOptions::default()
        },
    )
    .unwrap();
    for attempt in 0..2 {
        let err = st.pin_experts(layer, &[expert], attempt).unwrap_err();
        assert!(
            matches!(&err, Error::Checksum { layer: l, expert: e, .. } if (*l, *e) == (layer, expert)),
            "{err:?}"
        );
        let err = err.to_string();
        assert!(
            err.contains(&format!(
                "checksum mismatch in layer {layer} expert {expert} "
            )) && err.contains("the file is corrupt"),
            "{err}"
        );
    }
    for e in [expert - 1, expert + 1] {
        let slots = st.pin_experts(layer, &[e], 3).unwrap();
        st.unpin(slots[0]);
    }
    std::fs::remove_file(&packed).unwrap();
}
