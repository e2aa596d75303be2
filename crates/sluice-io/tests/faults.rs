//! A failing drive (`sluice_io::fault`): short reads are continued to the
//! right bytes by the engines themselves, `EIO` comes back as an error naming
//! the file and range, delays change nothing but timing, a torn completion
//! is caught, and an io_uring refusal falls back to the pread pool saying why.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use sluice_io::fault::{self, FaultPlan, Faults};
use sluice_io::{
    read_exact, widened_len, AlignedBuf, Completion, EngineOptions, IoKind, ReadEngine, ReadReq,
};

fn fixture(name: &str, len: usize) -> (PathBuf, Vec<u8>) {
    common::fixture("sluice-io-faults", name, len, 0xfa17)
}

/// io_uring and the pread pool, direct and buffered: the engines with a
/// read loop below the trait.
fn configs() -> Vec<EngineOptions> {
    let mut v = Vec::new();
    for direct in [true, false] {
        for kind in [IoKind::Uring, IoKind::Pread] {
            v.push(EngineOptions {
                kind,
                direct,
                queue_depth: 8,
                threads: 3,
                register: true,
            });
        }
    }
    v
}

/// Submits `n` random reads of `data`'s file (up to 300 KB each) in one
/// batch and returns each completion with its range and buffer.
fn read_many(
    e: &mut dyn ReadEngine,
    data: &[u8],
    seed: u64,
    n: usize,
) -> Vec<(Completion, u64, usize, AlignedBuf)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let align = e.align();
    let mut bufs = Vec::new();
    let mut reqs = Vec::new();
    for i in 0..n {
        let len = rng.usize(1..300_000);
        let offset = rng.usize(..=data.len() - len) as u64;
        let mut buf = AlignedBuf::new(widened_len(offset, len, align), align).unwrap();
        reqs.push(ReadReq {
            file: 0,
            offset,
            len,
            dst: buf.as_mut_ptr(),
            cap: buf.len(),
            buf_index: None,
            tag: i as u64,
        });
        bufs.push(Some((offset, len, buf)));
    }
    // SAFETY: each request has its own buffer, held in `bufs` until every completion has been returned below.
    unsafe { e.submit(&reqs).unwrap() };
    let mut out = Vec::new();
    e.wait(n, &mut out).unwrap();
    assert_eq!(out.len(), n);
    assert_eq!(e.in_flight(), 0);
    out.into_iter()
        .map(|c| {
            let (o, l, b) = bufs[c.tag as usize].take().expect("one completion per tag");
            (c, o, l, b)
        })
        .collect()
}

fn assert_bytes(c: &Completion, offset: u64, len: usize, buf: &AlignedBuf, data: &[u8]) {
    let d = c
        .result
        .as_ref()
        .unwrap_or_else(|e| panic!("read {offset}+{len} failed: {e}"));
    assert!(d.covers_wanted(), "{d:?}");
    assert!(
        buf[d.skip..d.skip + len] == data[offset as usize..offset as usize + len],
        "bytes differ for {offset}+{len}"
    );
}

/// Half of all reads below the trait come back short (block aligned under
/// O_DIRECT, as the kernel's are): every request still ends with exactly
/// the file's bytes, because the engines continue from where a read stopped.
#[test]
fn short_reads_are_continued_to_the_right_bytes() {
    let (path, data) = fixture("short", 3 << 20);
    for opts in configs() {
        let faults = Faults::new(FaultPlan {
            seed: 11,
            short: 0.5,
            ..FaultPlan::default()
        });
        let mut e = fault::open_engine(&opts, &faults).unwrap();
        e.open(&path).unwrap();
        eprintln!("{} ({:?})", e.describe(), e.notes());
        for (c, off, len, buf) in read_many(e.as_mut(), &data, 3, 64) {
            assert_bytes(&c, off, len, &buf, &data);
        }
        let (buf, skip) = read_exact(e.as_mut(), 0, 4097, 200_000).unwrap();
        assert!(buf[skip..skip + 200_000] == data[4097..204_097]);
        let n = faults.counts().short;
        assert!(n > 10, "{:?}: only {n} short reads injected", opts.kind);
    }
    std::fs::remove_file(&path).unwrap();
}

/// `EIO` on every request: each completion is an error naming the file, the
/// offset and the OS error, nothing is reported read; disarmed, the same
/// engine reads correctly again.
#[test]
fn eio_is_an_error_naming_the_file_and_range() {
    let (path, data) = fixture("eio", 1 << 20);
    for opts in configs() {
        let faults = Faults::new(FaultPlan {
            seed: 5,
            eio: 1.0,
            ..FaultPlan::default()
        });
        let mut e = fault::open_engine(&opts, &faults).unwrap();
        e.open(&path).unwrap();
        for (c, off, len, _) in read_many(e.as_mut(), &data, 9, 8) {
            let err = c.result.expect_err("EIO injected").to_string();
            assert!(
                err.contains(&path.display().to_string())
                    && err.contains(&format!("read of {len} bytes at offset {off}"))
                    && err.contains(&std::io::Error::from_raw_os_error(fault::EIO).to_string()),
                "{err}"
            );
        }
        assert_eq!(faults.counts().eio, 8);
        let err = read_exact(e.as_mut(), 0, 0, 10).unwrap_err();
        assert!(
            err.to_string()
                .contains(&std::io::Error::from_raw_os_error(fault::EIO).to_string()),
            "{err}"
        );
        faults.arm(false);
        for (c, off, len, buf) in read_many(e.as_mut(), &data, 9, 8) {
            assert_bytes(&c, off, len, &buf, &data);
        }
    }
    std::fs::remove_file(&path).unwrap();
}

/// A third of the requests fail and half are delayed by up to 3 ms, over
/// every engine (mmap included, through the generic wrapper): the failures
/// are exactly the injected ones and every other read has the right bytes.
#[test]
fn random_eio_and_delays_on_any_engine() {
    let (path, data) = fixture("mixed", 2 << 20);
    let mut all = configs();
    all.push(EngineOptions {
        kind: IoKind::Mmap,
        direct: false,
        ..EngineOptions::default()
    });
    for opts in all {
        let faults = Faults::new(FaultPlan {
            seed: 21,
            eio: 0.33,
            delay: 0.5,
            max_delay: Duration::from_millis(3),
            ..FaultPlan::default()
        });
        let inner = sluice_io::open_engine(&opts).unwrap();
        let mut e = fault::FaultEngine::new(inner, faults.clone());
        e.open(&path).unwrap();
        let mut failed = 0;
        for (c, off, len, buf) in read_many(&mut e, &data, 4, 96) {
            match &c.result {
                Err(err) => {
                    assert!(
                        err.to_string()
                            .contains(&std::io::Error::from_raw_os_error(fault::EIO).to_string()),
                        "{err}"
                    );
                    failed += 1;
                }
                Ok(_) => assert_bytes(&c, off, len, &buf, &data),
            }
        }
        let n = faults.counts();
        assert_eq!(failed, n.eio, "{:?}", opts.kind);
        assert!(n.eio > 10 && n.eio < 60 && n.delayed > 20, "{n:?}");
        assert_eq!(n.requests, 96);
    }
    std::fs::remove_file(&path).unwrap();
}

/// An engine that reports success for part of the wanted range (a torn
/// completion) is caught: `Done::covers_wanted` is false and `read_exact`
/// returns an error instead of the half-filled buffer.
#[test]
fn torn_completions_are_caught() {
    let (path, data) = fixture("torn", 1 << 20);
    for opts in configs() {
        let faults = Faults::new(FaultPlan {
            seed: 2,
            torn: 1.0,
            ..FaultPlan::default()
        });
        let mut e = fault::open_engine(&opts, &faults).unwrap();
        e.open(&path).unwrap();
        let err = read_exact(e.as_mut(), 0, 8192, 100_000).unwrap_err();
        assert!(
            err.to_string().contains("reported success after")
                && err.to_string().contains("of the wanted 100000 bytes"),
            "{err}"
        );
        let mut torn = 0;
        for (c, _, _, _) in read_many(e.as_mut(), &data, 8, 32) {
            if !c.result.as_ref().unwrap().covers_wanted() {
                torn += 1;
            }
        }
        assert!(torn > 0 && torn as u64 + 1 == faults.counts().torn);
    }
    std::fs::remove_file(&path).unwrap();
}

/// io_uring setup refused: the real fallback runs, the engine is the pread
/// pool, its notes and description give the reason, and it reads correctly.
#[test]
fn io_uring_refusal_falls_back_to_pread_with_the_reason() {
    let (path, data) = fixture("refuse", 1 << 20);
    let faults = Faults::new(FaultPlan {
        refuse_uring: true,
        ..FaultPlan::default()
    });
    let opts = EngineOptions {
        kind: IoKind::Uring,
        ..EngineOptions::default()
    };
    let mut e = fault::open_engine(&opts, &faults).unwrap();
    e.open(&path).unwrap();
    assert_eq!(e.kind(), IoKind::Pread);
    let notes = e.notes().join("; ");
    assert!(
        notes.contains("io_uring refused (io_uring_setup: ")
            && notes.contains("(injected fault)")
            && notes.contains("using the pread pool"),
        "{notes}"
    );
    assert!(e.describe().contains("pread pool (io_uring refused)"));
    for (c, off, len, buf) in read_many(e.as_mut(), &data, 1, 16) {
        assert_bytes(&c, off, len, &buf, &data);
    }
    std::fs::remove_file(&path).unwrap();
}
