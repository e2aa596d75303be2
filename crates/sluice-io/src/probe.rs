//! Measures what a drive delivers through an engine: random reads of one
//! size at one queue depth, as expert fetches are.

use std::time::Instant;

use sluice_core::{Error, Result};

use crate::{max_widened_len, AlignedBuf, Completion, FileId, ReadEngine, ReadReq, DIRECT_ALIGN};

/// The outcome of a [`probe`].
#[derive(Clone, Debug)]
pub struct ProbeResult {
    /// Bytes wanted per request.
    pub request_bytes: usize,
    /// Requests kept in flight.
    pub queue_depth: usize,
    /// Throughput of wanted bytes, in 10^9 bytes per second.
    pub gbps: f64,
    /// Mean request latency, seconds (submission to completion).
    pub mean_latency_s: f64,
    /// Median request latency, seconds.
    pub p50_latency_s: f64,
    /// 99th percentile request latency, seconds.
    pub p99_latency_s: f64,
    /// Wanted bytes read in all.
    pub bytes: u64,
    /// Wall time of the measurement, seconds.
    pub seconds: f64,
}

/// Reads `request_bytes` at random 4096-aligned offsets of `file` (of length
/// `file_len`), keeping `queue_depth` requests in flight, until both
/// `min_bytes` and `min_seconds` are reached (but no longer than
/// `10 * min_seconds` when that is positive). Deterministic offsets for a
/// given `seed`.
///
/// The engine must be idle. Drop the file's page cache first
/// ([`crate::sys::drop_page_cache`]) to measure the drive rather than memory
/// when the engine is not direct.
#[allow(clippy::too_many_arguments)]
pub fn probe(
    engine: &mut dyn ReadEngine,
    file: FileId,
    file_len: u64,
    request_bytes: usize,
    queue_depth: usize,
    min_bytes: u64,
    min_seconds: f64,
    seed: u64,
) -> Result<ProbeResult> {
    run(
        engine,
        file,
        file_len,
        (request_bytes, queue_depth, false),
        min_bytes,
        min_seconds,
        seed,
    )
}

/// Like [`probe`], but in bursts: `queue_depth` requests are submitted
/// together and all awaited before the next burst, the pattern of a forward
/// pass that reads one layer's missing experts and then computes. The
/// ratio of [`probe`] to this is what the drive idles between bursts.
#[allow(clippy::too_many_arguments)]
pub fn probe_bursts(
    engine: &mut dyn ReadEngine,
    file: FileId,
    file_len: u64,
    request_bytes: usize,
    queue_depth: usize,
    min_bytes: u64,
    min_seconds: f64,
    seed: u64,
) -> Result<ProbeResult> {
    run(
        engine,
        file,
        file_len,
        (request_bytes, queue_depth, true),
        min_bytes,
        min_seconds,
        seed,
    )
}

fn run(
    engine: &mut dyn ReadEngine,
    file: FileId,
    file_len: u64,
    (request_bytes, queue_depth, bursts): (usize, usize, bool),
    min_bytes: u64,
    min_seconds: f64,
    seed: u64,
) -> Result<ProbeResult> {
    if request_bytes == 0 || request_bytes as u64 > file_len {
        return Err(Error::Invalid(format!(
            "probe: request size {request_bytes} must be between 1 and the file size {file_len}"
        )));
    }
    if queue_depth == 0 {
        return Err(Error::Invalid(
            "probe: queue depth must be at least 1".into(),
        ));
    }
    if engine.in_flight() != 0 {
        return Err(Error::EngineBusy {
            op: "probe",
            in_flight: engine.in_flight(),
        });
    }
    let align = engine.align();
    let slot_len = max_widened_len(request_bytes, align);
    let mut bufs = (0..queue_depth)
        .map(|_| AlignedBuf::new(slot_len, DIRECT_ALIGN))
        .collect::<Result<Vec<_>>>()?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let max_block = (file_len - request_bytes as u64) / DIRECT_ALIGN as u64;
    let mut request = |buf: &mut AlignedBuf, tag: usize| ReadReq {
        file,
        offset: rng.u64(0..=max_block) * DIRECT_ALIGN as u64,
        len: request_bytes,
        dst: buf.as_mut_ptr(),
        cap: buf.len(),
        buf_index: None,
        tag: tag as u64,
    };

    let start = Instant::now();
    let hard_stop = (min_seconds > 0.0).then_some(min_seconds * 10.0);
    let mut latencies = Vec::new();
    let mut bytes = 0u64;
    let mut first_error = None;
    let mut last_completion = start;
    let mut done = Vec::with_capacity(queue_depth);
    let mut idle: Vec<usize> = Vec::with_capacity(queue_depth);

    let initial: Vec<ReadReq> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, b)| request(b, i))
        .collect();
    // SAFETY: each request targets its own buffer of `bufs`, which nothing else touches and which outlive every read: we wait for all of them below before returning, and leak the buffers if waiting fails.
    unsafe { engine.submit(&initial)? };
    let mut stopping = false;
    while engine.in_flight() > 0 {
        done.clear();
        if let Err(e) = engine.wait(1, &mut done) {
            std::mem::forget(bufs);
            return Err(e);
        }
        let mut again = Vec::with_capacity(done.len());
        for c in done.drain(..) {
            idle.push(c.tag as usize);
            let Completion {
                tag: _,
                result,
                submitted,
                completed,
            } = c;
            match result {
                Ok(d) => {
                    bytes += d.len as u64;
                    latencies.push(completed.saturating_duration_since(submitted).as_secs_f64());
                    last_completion = last_completion.max(completed);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                    stopping = true;
                }
            }
            if !stopping {
                let elapsed = start.elapsed().as_secs_f64();
                let enough = bytes >= min_bytes && elapsed >= min_seconds;
                if enough || hard_stop.is_some_and(|h| elapsed >= h) {
                    stopping = true;
                }
            }
        }
        // Steady mode refills at once; burst mode once the burst is done.
        if !stopping && (!bursts || engine.in_flight() == 0) {
            for t in idle.drain(..) {
                again.push(request(&mut bufs[t], t));
            }
        }
        if !again.is_empty() {
            // SAFETY: as for the initial batch; each buffer's previous read has completed (its completion is what freed it).
            if let Err(e) = unsafe { engine.submit(&again) } {
                first_error.get_or_insert(e);
                stopping = true;
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let seconds = last_completion.duration_since(start).as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    Ok(ProbeResult {
        request_bytes,
        queue_depth,
        gbps: if seconds > 0.0 {
            bytes as f64 / seconds / 1e9
        } else {
            0.0
        },
        mean_latency_s: latencies.iter().sum::<f64>() / latencies.len() as f64,
        p50_latency_s: pct(0.5),
        p99_latency_s: pct(0.99),
        bytes,
        seconds,
    })
}

/// Times `rounds` bursts of each of `sizes` reads of `request_bytes` (all
/// of a burst submitted together, all awaited), sizes interleaved so that a
/// patch of noise hits each alike, each burst after `gap_s` seconds with
/// nothing in flight: the pattern of a forward pass that computes a layer
/// with the drive idle, then reads the next layer's misses. Returns, per
/// size, each burst's seconds from submission to its last completion. What
/// an idle drive (or engine: a pool's sleeping threads) costs to wake shows
/// here and not in back-to-back bursts.
#[allow(clippy::too_many_arguments)]
pub fn idle_bursts(
    engine: &mut dyn ReadEngine,
    file: FileId,
    file_len: u64,
    request_bytes: usize,
    sizes: &[usize],
    gap_s: f64,
    rounds: usize,
    seed: u64,
) -> Result<Vec<Vec<f64>>> {
    let most = sizes.iter().copied().max().unwrap_or(0);
    if request_bytes == 0 || request_bytes as u64 > file_len || sizes.contains(&0) {
        return Err(Error::Invalid(format!(
            "probe: bursts of {sizes:?} requests of {request_bytes} bytes do not fit a file of {file_len} bytes"
        )));
    }
    if engine.in_flight() != 0 {
        return Err(Error::EngineBusy {
            op: "probe",
            in_flight: engine.in_flight(),
        });
    }
    let slot_len = max_widened_len(request_bytes, engine.align());
    let mut bufs = (0..most)
        .map(|_| AlignedBuf::new(slot_len, DIRECT_ALIGN))
        .collect::<Result<Vec<_>>>()?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let max_block = (file_len - request_bytes as u64) / DIRECT_ALIGN as u64;
    let mut out = vec![Vec::with_capacity(rounds); sizes.len()];
    let mut done = Vec::with_capacity(most);
    for _ in 0..rounds {
        for (&n, times) in sizes.iter().zip(&mut out) {
            std::thread::sleep(std::time::Duration::from_secs_f64(gap_s));
            let reqs: Vec<ReadReq> = bufs[..n]
                .iter_mut()
                .enumerate()
                .map(|(i, b)| ReadReq {
                    file,
                    offset: rng.u64(0..=max_block) * DIRECT_ALIGN as u64,
                    len: request_bytes,
                    dst: b.as_mut_ptr(),
                    cap: b.len(),
                    buf_index: None,
                    tag: i as u64,
                })
                .collect();
            let t = Instant::now();
            // SAFETY: each request targets its own buffer of `bufs`, which nothing else touches and which outlives every read: all are awaited below before the next burst or the return, and the buffers are leaked if waiting fails.
            unsafe { engine.submit(&reqs)? };
            let mut first_error = None;
            while engine.in_flight() > 0 {
                done.clear();
                if let Err(e) = engine.wait(1, &mut done) {
                    std::mem::forget(bufs);
                    return Err(e);
                }
                for c in done.drain(..) {
                    if let Err(e) = c.result {
                        first_error.get_or_insert(e);
                    }
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(out)
}

/// A burst's time as a fixed cost plus bytes over bandwidth, fitted by
/// least squares to `(bytes, seconds)` points: `(bytes per second, fixed
/// seconds)`. A negative fixed cost (noise) is clamped to zero and the
/// bandwidth refitted through the origin. `None` with fewer than two
/// distinct sizes or a fit that gives no positive bandwidth.
pub fn fit_bursts(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let slope = sxy / sxx;
    let fixed = my - slope * mx;
    if slope > 0.0 && fixed >= 0.0 {
        return Some((1.0 / slope, fixed));
    }
    let sxx0: f64 = points.iter().map(|p| p.0 * p.0).sum();
    let sxy0: f64 = points.iter().map(|p| p.0 * p.1).sum();
    (sxy0 > 0.0).then(|| (sxx0 / sxy0, 0.0))
}

#[cfg(test)]
mod tests {
    use super::fit_bursts;

    #[test]
    fn fit_recovers_fixed_cost_and_bandwidth() {
        let pts: Vec<(f64, f64)> = [1e6, 2e6, 4e6, 8e6]
            .iter()
            .map(|&b| (b, 2e-4 + b / 2e9))
            .collect();
        let (bw, fixed) = fit_bursts(&pts).unwrap();
        assert!((bw - 2e9).abs() < 1e3, "{bw}");
        assert!((fixed - 2e-4).abs() < 1e-9, "{fixed}");
    }

    #[test]
    fn negative_fixed_cost_is_clamped_and_refitted() {
        // Bigger bursts disproportionately slow: the line crosses below 0.
        let pts = [(1e6, 0.4e-3), (4e6, 2.2e-3)];
        let (bw, fixed) = fit_bursts(&pts).unwrap();
        assert_eq!(fixed, 0.0);
        // Through the origin: Σb² / Σbt.
        let want = (1e12 + 16e12) / (1e6 * 0.4e-3 + 4e6 * 2.2e-3);
        assert!((bw - want).abs() / want < 1e-12, "{bw} vs {want}");
    }

    #[test]
    fn one_size_or_no_positive_bandwidth_gives_none() {
        assert!(fit_bursts(&[(1e6, 1e-3), (1e6, 2e-3)]).is_none());
        assert!(fit_bursts(&[(1e6, 1e-3)]).is_none());
        assert!(fit_bursts(&[(1e6, -1e-3), (2e6, -2e-3)]).is_none());
    }
}
