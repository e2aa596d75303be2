use super::*;
use proptest::prelude::*;

fn k(e: usize) -> ExpertKey {
    ExpertKey::new(0, e)
}

fn demand(c: &mut SlotCache, e: usize, step: u64) -> Acquire {
    let r = c.acquire(k(e), step, 0.5);
    if let Acquire::Miss(s) = r {
        c.mark_ready(s);
    }
    r
}

#[test]
fn lru_evicts_least_recent() {
    let mut c = SlotCache::new(2, Box::new(Lru::new()));
    for (step, e) in [0, 1].into_iter().enumerate() {
        let Acquire::Miss(s) = demand(&mut c, e, step as u64) else {
            panic!("cold cache hit")
        };
        c.release(s);
    }
    // Touch 0, so 1 is the least recent.
    let Acquire::Hit(s) = demand(&mut c, 0, 2) else {
        panic!("0 should be resident")
    };
    c.release(s);
    let Acquire::Miss(s) = demand(&mut c, 2, 3) else {
        panic!("2 is new")
    };
    c.release(s);
    assert!(c.slot_of(k(1)).is_none(), "1 should have been evicted");
    assert!(c.slot_of(k(0)).is_some());
    assert_eq!(c.stats().evictions, 1);
}

#[test]
fn lfu_keeps_frequent_expert() {
    let mut c = SlotCache::new(2, Box::new(Lfu::new(1000.0)));
    let mut step = 0;
    for e in [0, 0, 0, 1] {
        if let Acquire::Hit(s) | Acquire::Miss(s) = demand(&mut c, e, step) {
            c.release(s);
        }
        step += 1;
    }
    // 1 is more recent but 0 is more frequent: 1 goes.
    if let Acquire::Miss(s) = demand(&mut c, 2, step) {
        c.release(s);
    }
    assert!(c.slot_of(k(0)).is_some());
    assert!(c.slot_of(k(1)).is_none());
}

#[test]
fn router_policy_weighs_probabilities() {
    let mut c = SlotCache::new(2, Box::new(RouterAware::new(8.0)));
    for (e, p) in [(0, 0.9), (1, 0.05)] {
        if let Acquire::Miss(s) = c.acquire(k(e), 0, p) {
            c.mark_ready(s);
            c.release(s);
        }
    }
    if let Acquire::Miss(s) = c.acquire(k(2), 1, 0.3) {
        c.mark_ready(s);
        c.release(s);
    }
    assert!(c.slot_of(k(0)).is_some(), "high-probability expert evicted");
    assert!(c.slot_of(k(1)).is_none());
}

#[test]
fn pinned_and_loading_slots_are_not_evicted() {
    for name in POLICY_NAMES {
        let mut c = SlotCache::new(2, policy_by_name(name).unwrap());
        let Acquire::Miss(a) = c.acquire(k(0), 0, 1.0) else {
            panic!()
        };
        // Still loading, and pinned.
        let Acquire::Miss(b) = c.acquire(k(1), 0, 1.0) else {
            panic!()
        };
        assert_eq!(c.acquire(k(2), 1, 1.0), Acquire::Full, "{name}");
        c.mark_ready(a);
        c.mark_ready(b);
        assert_eq!(c.acquire(k(2), 1, 1.0), Acquire::Full, "{name}: pinned");
        c.release(b);
        assert_eq!(c.acquire(k(2), 2, 1.0), Acquire::Miss(b), "{name}");
        assert_eq!(c.key(a), Some(k(0)));
    }
}

#[test]
fn failed_read_leaves_no_valid_slot() {
    let mut c = SlotCache::new(1, Box::new(Lru::new()));
    let Acquire::Miss(s) = c.acquire(k(3), 0, 1.0) else {
        panic!()
    };
    c.mark_failed(s);
    assert!(c.slot_of(k(3)).is_none());
    // The holder still has its pin; the slot returns once released.
    assert_eq!(c.acquire(k(4), 1, 1.0), Acquire::Full);
    c.release(s);
    assert_eq!(c.acquire(k(4), 1, 1.0), Acquire::Miss(s));
    c.check().unwrap();
}

/// Past the scratch limit, a wrong guess recycles an earlier unused
/// prefetch's slot instead of evicting a resident; a used prefetch becomes
/// an ordinary resident.
#[test]
fn prefetches_past_the_scratch_limit_evict_no_resident() {
    let mut c = SlotCache::new(4, Box::new(Lru::new()));
    c.set_scratch(1);
    for e in 0..4 {
        let Acquire::Miss(s) = demand(&mut c, e, e as u64) else {
            panic!()
        };
        c.release(s);
    }
    let pf = |c: &mut SlotCache, e: usize, step: u64| {
        let Acquire::Miss(s) = c.prefetch(k(e), step) else {
            panic!("prefetch {e} found no slot")
        };
        c.mark_ready(s);
    };
    pf(&mut c, 10, 5);
    assert_eq!(c.speculative(), 1);
    assert_eq!(
        c.take_displaced(),
        Some(k(0)),
        "LRU's victim, reported once"
    );
    assert_eq!(c.take_displaced(), None);
    let residents = |c: &SlotCache| (0..4).filter(|&e| c.slot_of(k(e)).is_some()).count();
    assert_eq!(
        residents(&c),
        3,
        "the first prefetch displaces the LRU resident"
    );
    pf(&mut c, 11, 6);
    assert_eq!(
        c.take_displaced(),
        None,
        "recycling a prefetch displaces no resident"
    );
    pf(&mut c, 12, 7);
    assert_eq!(residents(&c), 3, "later ones recycle the unused prefetch");
    assert!(c.slot_of(k(10)).is_none() && c.slot_of(k(12)).is_some());
    // A demand uses the prefetch: it is a resident now, and the next
    // prefetch may displace one resident again.
    let Acquire::Hit(s) = demand(&mut c, 12, 8) else {
        panic!()
    };
    c.release(s);
    assert_eq!(c.speculative(), 0);
    pf(&mut c, 13, 9);
    assert_eq!(residents(&c), 2);
    c.check().unwrap();
}

#[derive(Clone, Debug)]
enum Op {
    Demand(usize),
    Prefetch(usize),
    Complete(usize, bool),
    Release(usize),
    Evict(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..12usize).prop_map(Op::Demand),
        (0..12usize).prop_map(Op::Prefetch),
        (0..8usize, any::<bool>()).prop_map(|(i, ok)| Op::Complete(i, ok)),
        (0..8usize).prop_map(Op::Release),
        (0..12usize).prop_map(Op::Evict),
    ]
}

proptest! {
    /// Random interleavings of demand, prefetch, completion (success or
    /// failure), release and eviction never break the invariants: no
    /// pinned or loading slot is evicted, a key is in one slot at most,
    /// and there are never more residents than slots.
    #[test]
    fn invariants_hold(policy in 0..3usize, slots in 1..6usize, scratch in 0..4usize, ops in prop::collection::vec(op(), 1..if cfg!(miri) { 40 } else { 200 })) {
        let name = POLICY_NAMES[policy];
        let mut c = SlotCache::new(slots, policy_by_name(name).unwrap());
        c.set_scratch(scratch);
        let mut pins: Vec<usize> = Vec::new(); // slots we hold a pin on
        let mut loading: Vec<usize> = Vec::new();
        for (step, o) in ops.into_iter().enumerate() {
            let step = step as u64;
            // Snapshot of what must survive this op.
            let protected: Vec<(usize, ExpertKey)> = (0..slots)
                .filter(|&s| c.pins(s) > 0 || c.state(s) == SlotState::Loading)
                .filter_map(|s| c.key(s).map(|kk| (s, kk)))
                .collect();
            match o {
                Op::Demand(e) => match c.acquire(k(e), step, 0.3) {
                    Acquire::Hit(s) => pins.push(s),
                    Acquire::Miss(s) => { pins.push(s); loading.push(s); }
                    Acquire::Full => prop_assert!(
                        (0..slots).all(|s| c.pins(s) > 0 || c.state(s) != SlotState::Ready),
                        "Full with an evictable slot"),
                },
                Op::Prefetch(e) => {
                    let before: Vec<Option<ExpertKey>> = (0..slots).map(|s| c.key(s)).collect();
                    let spec = c.speculative();
                    if let Acquire::Miss(s) = c.prefetch(k(e), step) {
                        loading.push(s);
                        // Past the scratch limit a prefetch displaces only
                        // an unused prefetch (or takes an empty slot).
                        if spec >= scratch {
                            if let Some(old) = before[s] {
                                prop_assert!(c.speculative() <= spec.max(scratch),
                                    "prefetch evicted resident {:?} past the scratch limit", old);
                            }
                        }
                    }
                },
                Op::Complete(i, ok) => if !loading.is_empty() {
                    let s = loading.remove(i % loading.len());
                    if ok { c.mark_ready(s) } else { c.mark_failed(s) }
                },
                Op::Release(i) => if !pins.is_empty() {
                    let s = pins.remove(i % pins.len());
                    c.release(s);
                },
                Op::Evict(e) => {
                    let before = c.slot_of(k(e));
                    let dropped = c.evict(k(e));
                    if let (true, Some(s)) = (dropped, before) {
                        prop_assert!(!protected.iter().any(|&(ps, _)| ps == s));
                    }
                }
            }
            for (s, kk) in protected {
                // A protected key may only leave through a failed read.
                if c.key(s) != Some(kk) {
                    prop_assert_eq!(c.key(s), None, "protected slot {} reassigned", s);
                }
            }
            prop_assert!(c.len() <= slots);
            c.check().map_err(TestCaseError::fail)?;
        }
    }

    /// With immediate release, LRU hit counts equal a straightforward
    /// reference LRU over the same sequence.
    #[test]
    fn lru_matches_reference(slots in 1..8usize, seq in prop::collection::vec(0..16usize, 1..if cfg!(miri) { 60 } else { 300 })) {
        let mut c = SlotCache::new(slots, Box::new(Lru::new()));
        let mut reference: Vec<usize> = Vec::new(); // most recent last
        let mut hits = 0u64;
        for (step, &e) in seq.iter().enumerate() {
            if let Some(i) = reference.iter().position(|&x| x == e) {
                reference.remove(i);
                hits += 1;
            } else if reference.len() == slots {
                reference.remove(0);
            }
            reference.push(e);
            match demand(&mut c, e, step as u64) {
                Acquire::Hit(s) | Acquire::Miss(s) => c.release(s),
                Acquire::Full => prop_assert!(false, "nothing pinned, yet full"),
            }
        }
        prop_assert_eq!(c.stats().hits, hits);
    }
}

/// Cross-layer probabilities are follow-up frequencies: an expert that
/// always followed gets 1, one that followed every other token 0.5, and
/// the ranking puts the likelier first. A new token is noticed even when
/// the first MoE layer is not layer 0.
#[test]
fn cross_layer_probabilities_are_follow_frequencies() {
    let mut p = CrossLayer::new(4, 8);
    for t in 0..10u32 {
        p.observe(1, &[0]);
        p.observe(2, &[3, if t % 2 == 0 { 5 } else { 6 }]);
    }
    p.observe(1, &[0]);
    let mut out = Vec::new();
    p.predict_scored(2, 3, &mut out);
    assert_eq!(out[0], (3, 1.0));
    assert_eq!(out.len(), 3);
    for &(e, pr) in &out[1..] {
        assert!(e == 5 || e == 6);
        assert!((pr - 0.5).abs() < 1e-3, "{e}: {pr}");
    }
}

/// History's probability is the decayed share of recent tokens that used
/// the expert: 1 for one every token used, about half for one every other
/// token used, 0 before anything was seen.
#[test]
fn history_probabilities_are_decayed_shares() {
    let mut p = History::new(2, 8, 4.0);
    let mut out = Vec::new();
    p.predict_scored(1, 2, &mut out);
    assert!(out.iter().all(|&(_, pr)| pr == 0.0), "{out:?}");
    for t in 0..40u32 {
        p.observe(0, &[1]);
        p.observe(1, &[2, 3 + t % 2]);
    }
    p.observe(0, &[1]);
    p.predict_scored(1, 3, &mut out);
    assert_eq!(out[0].0, 2);
    assert!((out[0].1 - 1.0).abs() < 1e-4, "{out:?}");
    for &(e, pr) in &out[1..] {
        assert!(e == 3 || e == 4);
        assert!(pr > 0.3 && pr < 0.7, "{e}: {pr}");
    }
}
