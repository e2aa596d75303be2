//! Every engine, direct and buffered, against the bytes of a real file.
//!
//! Files live under CARGO_TARGET_TMPDIR, on the disk of the target directory,
//! so that O_DIRECT is exercised for real where the filesystem supports it;
//! the tests print what each engine actually was.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;

use proptest::prelude::*;
use sluice_core::Error;
use sluice_io::probe::probe;
use sluice_io::{
    max_widened_len, open_engine, read_exact, widened_len, AlignedBuf, Completion, EngineOptions,
    IoKind, ReadEngine, ReadReq, DIRECT_ALIGN,
};

fn fixture(name: &str, len: usize) -> (PathBuf, Vec<u8>) {
    common::fixture("sluice-io-tests", name, len, 0x5eed)
}

/// The engine configurations under test: each kind, direct and buffered,
/// io_uring with and without registration.
fn configs() -> Vec<EngineOptions> {
    let mut v = Vec::new();
    for direct in [true, false] {
        for (kind, register) in [
            (IoKind::Uring, true),
            (IoKind::Uring, false),
            (IoKind::Pread, true),
            (IoKind::Mmap, true),
        ] {
            v.push(EngineOptions {
                kind,
                direct,
                queue_depth: 8,
                threads: 3,
                register,
            });
        }
    }
    v
}

fn open(opts: &EngineOptions, path: &std::path::Path) -> Box<dyn ReadEngine> {
    let mut e = open_engine(opts).unwrap();
    e.open(path).unwrap();
    eprintln!(
        "asked {:?} direct={} register={}: {} | notes: {:?}",
        opts.kind,
        opts.direct,
        opts.register,
        e.describe(),
        e.notes()
    );
    if opts.kind == IoKind::Mmap {
        assert!(!e.direct());
        assert_eq!(e.align(), 1);
    }
    if !opts.direct {
        assert!(!e.direct());
        assert_eq!(e.align(), 1);
    }
    if e.direct() {
        assert_eq!(e.align(), DIRECT_ALIGN);
    }
    e
}

/// A wanted range and the buffer it is read into.
struct Pending {
    offset: u64,
    len: usize,
    buf: AlignedBuf,
}

/// Random ranges: offsets on 32-byte boundaries (GGUF slabs), on block
/// boundaries and arbitrary; lengths from 1 byte to a few blocks, some
/// ending exactly at end of file.
fn random_ranges(rng: &mut fastrand::Rng, file_len: usize, n: usize) -> Vec<(u64, usize)> {
    (0..n)
        .map(|i| {
            let len = match i % 5 {
                0 => rng.usize(1..64),
                1 => rng.usize(1..3 * DIRECT_ALIGN),
                2 => DIRECT_ALIGN * rng.usize(1..8),
                _ => rng.usize(1..300_000),
            };
            let max_off = file_len - len;
            let offset = match i % 4 {
                0 => rng.usize(..=max_off) / 32 * 32,
                1 => rng.usize(..=max_off) / DIRECT_ALIGN * DIRECT_ALIGN,
                2 => max_off, // ends at end of file
                _ => rng.usize(..=max_off),
            };
            (offset as u64, len)
        })
        .collect()
}

fn check(c: &Completion, p: &Pending, data: &[u8], align: usize) {
    let done = c
        .result
        .as_ref()
        .unwrap_or_else(|e| panic!("read {}+{} failed: {e}", p.offset, p.len));
    assert_eq!(done.len, p.len);
    assert_eq!(done.skip, (p.offset % align as u64) as usize, "skip");
    assert!(done.bytes_read >= done.skip + done.len, "{done:?}");
    assert!(
        done.bytes_read <= widened_len(p.offset, p.len, align),
        "{done:?}"
    );
    let got = &p.buf[done.skip..done.skip + done.len];
    let want = &data[p.offset as usize..p.offset as usize + p.len];
    assert!(got == want, "bytes differ for {}+{}", p.offset, p.len);
    assert!(c.completed >= c.submitted);
}

#[test]
fn random_reads_every_engine() {
    // Not a multiple of the block size: the last block is short.
    let file_len = (4 << 20) + 1234;
    let (path, data) = fixture("random", file_len);
    for (ci, opts) in configs().iter().enumerate() {
        let mut e = open(opts, &path);
        let align = e.align();
        let mut rng = fastrand::Rng::with_seed(ci as u64);
        let ranges = random_ranges(&mut rng, file_len, 240);
        let mut slots: Vec<Pending> = ranges
            .iter()
            .map(|&(offset, len)| Pending {
                offset,
                len,
                buf: AlignedBuf::new(max_widened_len(len, align), DIRECT_ALIGN).unwrap(),
            })
            .collect();
        let reqs: Vec<ReadReq> = slots
            .iter_mut()
            .enumerate()
            .map(|(i, p)| ReadReq {
                file: 0,
                offset: p.offset,
                len: p.len,
                dst: p.buf.as_mut_ptr(),
                cap: p.buf.len(),
                buf_index: None,
                tag: i as u64,
            })
            .collect();
        // Batches much larger than the queue depth, interleaved with waiting
        // for only some completions, and polling.
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for (bi, batch) in reqs.chunks(60).enumerate() {
            // SAFETY: each request has its own buffer in `slots`, untouched until its completion is checked; `slots` outlives the engine's reads (we wait for all of them before it is dropped).
            unsafe { e.submit(batch).unwrap() };
            let before = out.len();
            e.wait(5, &mut out).unwrap();
            assert!(out.len() - before >= 5);
            if bi % 2 == 1 {
                e.poll(&mut out).unwrap();
            }
        }
        let rest = e.in_flight();
        e.wait(rest, &mut out).unwrap();
        assert_eq!(e.in_flight(), 0);
        assert_eq!(out.len(), reqs.len());
        for c in &out {
            assert!(seen.insert(c.tag), "tag {} completed twice", c.tag);
            check(c, &slots[c.tag as usize], &data, align);
        }
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn interleaved_submit_and_wait_keep_many_in_flight() {
    let file_len = 3 << 20;
    let (path, data) = fixture("interleaved", file_len);
    for opts in configs() {
        let mut e = open(&opts, &path);
        let align = e.align();
        let mut rng = fastrand::Rng::with_seed(99);
        let ranges = random_ranges(&mut rng, file_len, 300);
        let depth = 24; // more than the engine's queue depth of 8
        let mut slots: Vec<Option<Pending>> = (0..depth).map(|_| None).collect();
        let mut next = 0;
        let mut checked = 0;
        let mut out = Vec::new();
        while checked < ranges.len() {
            let mut batch = Vec::new();
            for (i, slot) in slots.iter_mut().enumerate() {
                if slot.is_none() && next < ranges.len() {
                    let (offset, len) = ranges[next];
                    next += 1;
                    let mut buf = AlignedBuf::new(widened_len(offset, len, align), align).unwrap();
                    batch.push(ReadReq {
                        file: 0,
                        offset,
                        len,
                        dst: buf.as_mut_ptr(),
                        cap: buf.len(),
                        buf_index: None,
                        tag: i as u64,
                    });
                    *slot = Some(Pending { offset, len, buf });
                }
            }
            // SAFETY: as in random_reads_every_engine; a slot's buffer is only reused after its completion came back.
            unsafe { e.submit(&batch).unwrap() };
            out.clear();
            e.wait(1, &mut out).unwrap();
            for c in &out {
                let p = slots[c.tag as usize].take().expect("live slot");
                check(c, &p, &data, align);
                checked += 1;
            }
        }
        assert_eq!(e.in_flight(), 0);
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn past_end_of_file_is_an_error_and_the_engine_stays_usable() {
    let file_len = 10_000;
    let (path, data) = fixture("eof", file_len);
    for opts in configs() {
        let mut e = open(&opts, &path);
        let align = e.align();
        let cases: [(u64, usize, bool); 6] = [
            (9_000, 1_000, true), // ends exactly at EOF
            (8_192, 1_808, true), // the short last block, whole
            (9_000, 2_000, false),
            (10_000, 1, false),
            (20_000, 100, false),
            (0, file_len + 1, false),
        ];
        let mut bufs: Vec<AlignedBuf> = cases
            .iter()
            .map(|&(_, len, _)| AlignedBuf::new(max_widened_len(len, align), DIRECT_ALIGN).unwrap())
            .collect();
        let reqs: Vec<ReadReq> = cases
            .iter()
            .zip(bufs.iter_mut())
            .enumerate()
            .map(|(i, (&(offset, len, _), b))| ReadReq {
                file: 0,
                offset,
                len,
                dst: b.as_mut_ptr(),
                cap: b.len(),
                buf_index: None,
                tag: i as u64,
            })
            .collect();
        // SAFETY: one buffer per request, all outliving the reads.
        unsafe { e.submit(&reqs).unwrap() };
        let mut out = Vec::new();
        e.wait(cases.len(), &mut out).unwrap();
        assert_eq!(out.len(), cases.len());
        for c in &out {
            let (offset, len, ok) = cases[c.tag as usize];
            match &c.result {
                Ok(d) => {
                    assert!(ok, "{offset}+{len} past EOF succeeded: {d:?}");
                    let b = &bufs[c.tag as usize];
                    assert_eq!(
                        &b[d.skip..d.skip + len],
                        &data[offset as usize..offset as usize + len]
                    );
                }
                Err(err) => {
                    assert!(!ok, "{offset}+{len} failed: {err}");
                    let Error::Io { path: p, source } = err else {
                        panic!("not an I/O error: {err:?}");
                    };
                    assert_eq!(p, &path);
                    assert_eq!(source.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
                    assert!(
                        err.to_string().contains(&format!("offset {offset}")),
                        "{err}"
                    );
                }
            }
        }
        // Still usable.
        let (buf, skip) = read_exact(e.as_mut(), 0, 4_000, 3_000).unwrap();
        assert_eq!(&buf[skip..skip + 3_000], &data[4_000..7_000]);
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn read_exact_and_empty_reads() {
    let file_len = 1 << 20;
    let (path, data) = fixture("exact", file_len);
    for opts in configs() {
        let mut e = open(&opts, &path);
        for (offset, len) in [
            (0u64, 1usize),
            (32, 4096),
            (4095, 2),
            (12_345, 200_000),
            (100, 0),
        ] {
            let (buf, skip) = read_exact(e.as_mut(), 0, offset, len).unwrap();
            assert_eq!(buf.as_ptr() as usize % e.align(), 0);
            assert_eq!(buf.len(), widened_len(offset, len, e.align()));
            assert_eq!(
                &buf[skip..skip + len],
                &data[offset as usize..offset as usize + len]
            );
        }
        assert!(read_exact(e.as_mut(), 0, file_len as u64 - 10, 11).is_err());
        assert!(matches!(
            read_exact(e.as_mut(), 7, 0, 1),
            Err(Error::NoSuchFile { id: 7, .. })
        ));
        // Busy engines are refused.
        let mut b = AlignedBuf::new(DIRECT_ALIGN, DIRECT_ALIGN).unwrap();
        let req = ReadReq {
            file: 0,
            offset: 0,
            len: 10,
            dst: b.as_mut_ptr(),
            cap: b.len(),
            buf_index: None,
            tag: 1,
        };
        // SAFETY: `b` outlives the read, which is waited for below.
        unsafe { e.submit(&[req]).unwrap() };
        assert!(matches!(
            read_exact(e.as_mut(), 0, 0, 1),
            Err(Error::EngineBusy { .. })
        ));
        let mut out = Vec::new();
        e.wait(1, &mut out).unwrap();
        assert_eq!(&b[..10], &data[..10]);
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn bad_requests_are_refused_whole() {
    let (path, _) = fixture("bad", 100_000);
    for opts in configs() {
        let mut e = open(&opts, &path);
        let align = e.align();
        let mut b = AlignedBuf::new(4 * DIRECT_ALIGN, DIRECT_ALIGN).unwrap();
        let good = ReadReq {
            file: 0,
            offset: 32,
            len: 100,
            dst: b.as_mut_ptr(),
            cap: b.len(),
            buf_index: None,
            tag: 0,
        };
        let small = ReadReq { cap: 99, ..good };
        let wrong_file = ReadReq { file: 3, ..good };
        for bad in [small, wrong_file] {
            // SAFETY: `b` outlives the engine; nothing is queued anyway.
            let r = unsafe { e.submit(&[good, bad]) };
            assert!(
                matches!(r, Err(Error::Invalid(_) | Error::NoSuchFile { id: 3, .. })),
                "{r:?}"
            );
            assert_eq!(e.in_flight(), 0, "a refused batch must queue nothing");
        }
        if align > 1 {
            // One byte short of the widened read.
            let tight = ReadReq {
                cap: widened_len(32, 100, align) - 1,
                ..good
            };
            // SAFETY: as above.
            let r = unsafe { e.submit(&[tight]) };
            assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
            let misaligned = ReadReq {
                // SAFETY: still inside `b`.
                dst: unsafe { b.as_mut_ptr().add(1) },
                cap: b.len() - 1,
                ..good
            };
            // SAFETY: as above.
            let r = unsafe { e.submit(&[misaligned]) };
            assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
        }
        assert!(e.open(&path.with_extension("missing")).is_err());
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn registered_buffers_with_read_fixed() {
    let file_len = 2 << 20;
    let (path, data) = fixture("fixed", file_len);
    for direct in [true, false] {
        let opts = EngineOptions {
            kind: IoKind::Uring,
            direct,
            queue_depth: 4,
            ..EngineOptions::default()
        };
        let mut e = open(&opts, &path);
        let align = e.align();
        let slot = max_widened_len(100_000, align);
        let slots_per_buf = 8;
        let mut arenas: Vec<AlignedBuf> = (0..2)
            .map(|_| AlignedBuf::new(slot * slots_per_buf, DIRECT_ALIGN).unwrap())
            .collect();
        let regions: Vec<(*mut u8, usize)> = arenas
            .iter_mut()
            .map(|a| (a.as_mut_ptr(), a.len()))
            .collect();
        // The engine owns the arenas from here on; `regions` still address them.
        let registered = e.register_buffers(arenas).unwrap();
        eprintln!(
            "uring direct={direct}: registered={registered}: {} | {:?}",
            e.describe(),
            e.notes()
        );
        if e.kind() == IoKind::Uring {
            assert_eq!(registered, e.describe().contains("registered buffers"));
        } else {
            assert!(!registered);
        }
        let mut rng = fastrand::Rng::with_seed(5);
        let mut reqs = Vec::new();
        let mut wanted = Vec::new();
        for (a, region) in regions.iter().enumerate() {
            for s in 0..slots_per_buf {
                let len = rng.usize(1..=100_000);
                let offset = rng.usize(..=file_len - len) as u64 / 32 * 32;
                let tag = reqs.len();
                reqs.push(ReadReq {
                    file: 0,
                    offset,
                    len,
                    // SAFETY: slot `s` lies inside arena `a`.
                    dst: unsafe { region.0.add(s * slot) },
                    cap: slot,
                    buf_index: Some(a as u32),
                    tag: tag as u64,
                });
                wanted.push((a, s, offset, len));
            }
        }
        if registered {
            // A destination outside the buffer it names is refused.
            let wrong = ReadReq {
                buf_index: Some(1),
                ..reqs[0]
            };
            // SAFETY: refused before anything is queued.
            let r = unsafe { e.submit(&[wrong]) };
            assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
            let missing = ReadReq {
                buf_index: Some(2),
                ..reqs[0]
            };
            // SAFETY: as above.
            let r = unsafe { e.submit(&[missing]) };
            assert!(matches!(r, Err(Error::Invalid(_))), "{r:?}");
        }
        // SAFETY: each request has its own slot in the arenas, which outlive the engine.
        unsafe { e.submit(&reqs).unwrap() };
        let mut out = Vec::new();
        e.wait(reqs.len(), &mut out).unwrap();
        assert_eq!(out.len(), reqs.len());
        for c in &out {
            let (a, s, offset, len) = wanted[c.tag as usize];
            let d = c.result.as_ref().unwrap();
            let base = s * slot + d.skip;
            // SAFETY: every read has completed, so nothing writes to the arena, which the engine (alive here) owns; the range lies inside it.
            let got = unsafe { std::slice::from_raw_parts(regions[a].0.add(base), len) };
            assert_eq!(got, &data[offset as usize..offset as usize + len]);
        }
        // Replacing the buffers needs an idle engine, which it is now.
        assert!(e.register_buffers(Vec::new()).is_ok());
        drop(e);
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn tmpfs_falls_back_to_buffered() {
    let dir = PathBuf::from("/dev/shm");
    if !dir.is_dir() {
        eprintln!("no /dev/shm; skipping");
        return;
    }
    let path = dir.join(format!("sluice-io-tmpfs-{}.bin", std::process::id()));
    let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    for kind in [IoKind::Uring, IoKind::Pread] {
        let mut e = open_engine(&EngineOptions {
            kind,
            ..EngineOptions::default()
        })
        .unwrap();
        e.open(&path).unwrap();
        eprintln!("{kind:?} on /dev/shm: {} | {:?}", e.describe(), e.notes());
        if e.direct() {
            eprintln!("/dev/shm accepted O_DIRECT here; nothing to fall back from");
            continue;
        }
        assert_eq!(e.align(), 1);
        assert!(e.notes().iter().any(|n| n.contains("O_DIRECT refused")));
        assert!(
            e.describe().contains("O_DIRECT refused"),
            "{}",
            e.describe()
        );
        let (buf, skip) = read_exact(e.as_mut(), 0, 33, 40_000).unwrap();
        assert_eq!(skip, 0);
        assert_eq!(&buf[..], &data[33..40_033]);
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn dropping_with_reads_in_flight_waits_for_them() {
    let file_len = 4 << 20;
    let (path, _) = fixture("drop", file_len);
    for opts in configs() {
        let mut bufs: Vec<AlignedBuf> = (0..64)
            .map(|_| AlignedBuf::new(1 << 16, DIRECT_ALIGN).unwrap())
            .collect();
        {
            let mut e = open(&opts, &path);
            let reqs: Vec<ReadReq> = bufs
                .iter_mut()
                .enumerate()
                .map(|(i, b)| ReadReq {
                    file: 0,
                    offset: (i as u64 * 61_440) % (file_len as u64 - (1 << 16)),
                    len: 60_000,
                    dst: b.as_mut_ptr(),
                    cap: b.len(),
                    buf_index: None,
                    tag: i as u64,
                })
                .collect();
            // SAFETY: the buffers outlive the engine, whose Drop waits for the reads it started.
            unsafe { e.submit(&reqs).unwrap() };
            assert_eq!(e.in_flight(), 64);
        }
        // Freed only now, after the engine's Drop has returned.
        drop(bufs);
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn probe_measures_every_engine() {
    let file_len = 2 << 20;
    let (path, _) = fixture("probe", file_len);
    for opts in configs() {
        let mut e = open(&opts, &path);
        let r = probe(
            e.as_mut(),
            0,
            file_len as u64,
            64 << 10,
            4,
            4 << 20,
            0.02,
            1,
        )
        .unwrap();
        eprintln!("{:?} direct={}: {r:?}", opts.kind, e.direct());
        assert!(r.gbps > 0.0 && r.gbps.is_finite());
        // 4 MiB, unless the probe's hard stop (ten times min_seconds) came
        // first on a loaded machine.
        assert!(r.bytes >= 4 << 20 || r.seconds >= 0.2, "{r:?}");
        assert_eq!(r.bytes % (64 << 10), 0);
        assert!(r.seconds > 0.0);
        assert!(r.p50_latency_s <= r.p99_latency_s);
        assert!(r.mean_latency_s > 0.0);
        assert_eq!(e.in_flight(), 0);
        // Odd sizes and a request as large as the file.
        let r = probe(e.as_mut(), 0, file_len as u64, file_len, 2, 1, 0.0, 2).unwrap();
        assert!(r.bytes >= file_len as u64);
        assert!(matches!(
            probe(e.as_mut(), 0, file_len as u64, file_len + 1, 2, 1, 0.0, 2),
            Err(Error::Invalid(_))
        ));
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn io_uring_is_used_where_available() {
    let (path, _) = fixture("available", 8192);
    let mut e = open_engine(&EngineOptions::default()).unwrap();
    e.open(&path).unwrap();
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    eprintln!(
        "default engine: {:?}: {} | notes {:?} | kernel.io_uring_disabled={disabled:?}",
        e.kind(),
        e.describe(),
        e.notes()
    );
    if !cfg!(target_os = "linux") {
        // Elsewhere the pread pool is the default, chosen, not fallen back to.
        assert_eq!(e.kind(), IoKind::Pread);
        assert!(e.notes().is_empty(), "{:?}", e.notes());
    } else if e.kind() == IoKind::Pread {
        // The fallback must say why.
        assert!(e.notes().iter().any(|n| n.contains("io_uring refused")));
    } else {
        assert_eq!(e.kind(), IoKind::Uring);
        assert!(e.describe().starts_with("io_uring"));
    }
    std::fs::remove_file(&path).unwrap();
}

proptest! {
    // Integration tests have no lib.rs next to them to persist failures by.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn widening_covers_and_is_bounded(
        offset in 0u64..(1 << 50),
        len in 0usize..(1 << 26),
        align in prop::sample::select(vec![1usize, 2, 512, 4096, 65536]),
    ) {
        let w = widened_len(offset, len, align);
        prop_assert!(w <= max_widened_len(len, align));
        if len == 0 {
            prop_assert_eq!(w, 0);
        } else {
            let a = align as u64;
            let start = offset / a * a;
            let end = start + w as u64;
            prop_assert_eq!(start % a, 0);
            prop_assert_eq!(end % a, 0);
            prop_assert!(end >= offset + len as u64);
            // Tight: one block less would not cover the range.
            prop_assert!(end - a < offset + len as u64);
            if align == 1 {
                prop_assert_eq!(w, len);
            }
        }
        // The bound is attained by the worst offset when len is aligned.
        if align > 1 && len > 0 && len % align == 0 {
            prop_assert_eq!(widened_len(align as u64 - 1, len, align), max_widened_len(len, align));
        }
    }
}
