//! The RAM budget: where the cap goes, and how many expert slots are left
//! once everything else is counted. One pure planning function serves the
//! real streamer and the simulator alike.

use sluice_core::{fmt_size, Error, Result};
use sluice_format::config::Config;

/// Where the RAM cap goes. All figures in bytes.
#[derive(Clone, Debug, Default)]
pub struct Budget {
    /// The cap (`u64::MAX` when none).
    pub cap: u64,
    /// Resident set of the process before any weight was read: code,
    /// tokenizer, headers, allocator.
    pub baseline: u64,
    /// Safety margin for allocator slack and thread stacks.
    pub margin: u64,
    /// Dense weights, read into owned buffers.
    pub dense: u64,
    /// KV cache for `ctx` tokens.
    pub kv: u64,
    /// Activations and per-thread buffers for the largest batch.
    pub scratch: u64,
    /// The compute backend's own copies in the same RAM
    /// ([`StreamOptions::device_copies`](crate::StreamOptions::device_copies)).
    pub device: u64,
    /// One expert slot (largest read plan, widened for direct I/O).
    pub slot: u64,
    /// Slots allocated.
    pub slots: usize,
    /// Routed experts in the model.
    pub experts_total: usize,
}

impl Budget {
    /// Headroom kept under a cap: allocator slack and stacks.
    pub fn margin_for(cap: u64) -> u64 {
        if cap == u64::MAX {
            0
        } else {
            (16 << 20) + cap / 100
        }
    }

    /// Bytes planned in all.
    pub fn planned(&self) -> u64 {
        self.fixed() + self.slot * self.slots as u64
    }

    /// Bytes planned before any slot.
    pub fn fixed(&self) -> u64 {
        self.baseline + self.margin + self.dense + self.kv + self.scratch + self.device
    }

    /// One line for the user.
    pub fn describe(&self) -> String {
        let mb = |b: u64| b as f64 / 1e6;
        let cap = if self.cap == u64::MAX {
            "no cap".to_string()
        } else {
            format!("cap {:.1} MB", mb(self.cap))
        };
        let device = if self.device > 0 {
            format!(" + GPU copies {:.1} MB", mb(self.device))
        } else {
            String::new()
        };
        format!(
            "{cap}: process {:.1} MB + margin {:.1} MB + dense {:.1} MB + KV {:.1} MB + scratch {:.1} MB{device} + {} expert slots × {:.2} MB = {:.1} MB ({} of {} experts fit)",
            mb(self.baseline),
            mb(self.margin),
            mb(self.dense),
            mb(self.kv),
            mb(self.scratch),
            self.slots,
            mb(self.slot),
            mb(self.planned()),
            self.slots.min(self.experts_total),
            self.experts_total
        )
    }
}

/// What a plan must hold besides the slots.
#[derive(Clone, Copy, Debug)]
pub struct Demand {
    /// Slots asked for explicitly (`None`: as many as fit).
    pub slots: Option<usize>,
    /// Slots a layer needs at least (the model's top-k); 0 where fewer
    /// are allowed (a simulation with a fixed hit rate).
    pub min_slots: usize,
    /// Memory the machine can give when there is no cap (`None`: unknown,
    /// no limit beyond the number of experts).
    pub available: Option<u64>,
}

/// Sizes `b.slots` from the cap and everything else `b` counts: as many
/// slots as fit (every expert at most), or exactly `d.slots`. Fails with
/// [`Error::Budget`] when the cap cannot hold one layer's experts or the
/// slots asked for, and with [`Error::Invalid`] for zero slots.
pub fn plan(mut b: Budget, d: Demand) -> Result<Budget> {
    let fixed = b.fixed();
    // A layer never needs more slots than it has experts.
    let min_slots = d.min_slots.min(b.experts_total);
    let fit = if b.slot == 0 {
        0
    } else if b.cap == u64::MAX {
        let avail = d.available.unwrap_or(u64::MAX);
        (avail.saturating_sub(fixed) / b.slot).min(b.experts_total as u64) as usize
    } else {
        (b.cap.saturating_sub(fixed) / b.slot).min(b.experts_total as u64) as usize
    };
    b.slots = match d.slots {
        Some(0) if b.experts_total > 0 => {
            return Err(Error::Invalid("at least 1 expert slot is needed".into()))
        }
        Some(s) if s > fit && b.cap != u64::MAX => {
            let want = Budget {
                slots: s,
                ..b.clone()
            };
            return Err(Error::Budget {
                needed: want.planned(),
                cap: b.cap,
                parts: parts(&want, s, "expert slots"),
            });
        }
        // Fewer slots than top-k still computes correctly, a wave of
        // reads at a time: allowed when asked for explicitly.
        Some(s) => s.min(b.experts_total.max(1)),
        None if fit < min_slots => {
            let want = Budget {
                slots: min_slots,
                ..b.clone()
            };
            return Err(Error::Budget {
                needed: want.planned(),
                cap: b.cap,
                parts: parts(&want, min_slots, "experts of one layer"),
            });
        }
        None => fit,
    };
    Ok(b)
}

/// The parts of `b` in words, for [`Error::Budget`].
fn parts(b: &Budget, slots: usize, what: &str) -> String {
    let mb = |x: u64| x as f64 / 1e6;
    format!(
        "dense weights {:.1} MB + KV cache {:.1} MB + scratch {:.1} MB + GPU copies {:.1} MB + process {:.1} MB + {slots} {what} ({:.1} MB, {} each)",
        mb(b.dense),
        mb(b.kv),
        mb(b.scratch),
        mb(b.device),
        mb(b.baseline + b.margin),
        mb(b.slot * slots as u64),
        fmt_size(b.slot)
    )
}

/// Bytes of activations and buffers for a batch of `n` tokens of a model
/// whose widest expert has `inter` rows, with `ctx` positions and
/// `threads` compute threads (also the simulator's figure).
pub fn scratch_bytes(c: &Config, inter: usize, n: usize, ctx: usize, threads: usize) -> u64 {
    let (h, qd, kd) = (c.hidden, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let per_token = 8 * h + 3 * qd + 2 * kd + 3 * inter + 2 * c.n_experts;
    let per_thread = ctx + 4 * h.max(inter).max(qd);
    // Twice over: the allocator does not hand every freed page back.
    2 * 4 * (n * per_token + c.vocab * n.min(8) + threads * per_thread) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn budget(cap: u64, slot: u64, experts: usize) -> Budget {
        Budget {
            cap,
            baseline: 10 << 20,
            margin: Budget::margin_for(cap),
            dense: 100 << 20,
            kv: 5 << 20,
            scratch: 1 << 20,
            device: 0,
            slot,
            slots: 0,
            experts_total: experts,
        }
    }

    proptest! {
        /// A plan never exceeds its cap, fills it with as many slots as
        /// fit (every expert at most), and refuses with the shortfall when
        /// one layer's experts do not fit.
        #[test]
        fn plans_stay_under_the_cap(cap_mb in 1u64..4096, slot_kb in 1u64..65536, experts in 1usize..2000, k in 1usize..16) {
            let cap = cap_mb << 20;
            let b = budget(cap, slot_kb << 10, experts);
            let d = Demand { slots: None, min_slots: k, available: None };
            match plan(b.clone(), d) {
                Ok(p) => {
                    prop_assert!(p.planned() <= cap);
                    prop_assert!(p.slots >= k.min(experts));
                    prop_assert!(p.slots == experts || p.planned() + p.slot > cap);
                }
                Err(Error::Budget { needed, cap: c, .. }) => {
                    prop_assert_eq!(c, cap);
                    prop_assert!(needed > cap);
                    prop_assert_eq!(needed, b.fixed() + b.slot * k.min(experts) as u64);
                }
                Err(e) => prop_assert!(false, "{e}"),
            }
        }
    }

    #[test]
    fn explicit_slots() {
        let b = budget(1 << 30, 1 << 20, 100);
        let d = |s| Demand {
            slots: Some(s),
            min_slots: 8,
            available: None,
        };
        assert_eq!(plan(b.clone(), d(3)).unwrap().slots, 3);
        assert!(matches!(plan(b.clone(), d(500)), Err(Error::Budget { .. })));
        assert!(matches!(plan(b.clone(), d(0)), Err(Error::Invalid(_))));
        // No cap: every expert, within what the machine has.
        let free = Budget {
            cap: u64::MAX,
            margin: 0,
            ..b
        };
        let d = Demand {
            slots: None,
            min_slots: 8,
            available: Some(free.fixed() + (40 << 20)),
        };
        assert_eq!(plan(free, d).unwrap().slots, 40);
    }
}
