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

/// A prefetch its layer did not use is the next slot evicted, before
/// LRU's oldest resident: a wrong guess keeps no resident out for longer
/// than its layer. One a demand used since is an ordinary resident.
#[test]
fn a_discarded_prefetch_goes_first() {
    let mut c = SlotCache::new(4, Box::new(Lru::new()));
    for e in 0..3 {
        let Acquire::Miss(s) = demand(&mut c, e, e as u64) else {
            panic!()
        };
        c.release(s);
    }
    let Acquire::Miss(wrong) = c.prefetch(k(10), 3) else {
        panic!()
    };
    c.mark_ready(wrong);
    c.discard(wrong);
    let Acquire::Miss(s) = demand(&mut c, 5, 4) else {
        panic!()
    };
    assert_eq!(s, wrong, "the discarded guess, not resident 0, made room");
    assert!(c.slot_of(k(0)).is_some() && c.slot_of(k(10)).is_none());
    c.release(s);
    // A guess discarded, then used by a demand: a resident like any other.
    let Acquire::Miss(late) = c.prefetch(k(11), 5) else {
        panic!()
    };
    c.mark_ready(late);
    c.discard(late);
    let Acquire::Hit(h) = demand(&mut c, 11, 6) else {
        panic!()
    };
    c.release(h);
    let Acquire::Miss(s) = demand(&mut c, 6, 7) else {
        panic!()
    };
    assert_ne!(s, late, "used since: LRU decides");
    assert!(c.slot_of(k(11)).is_some());
    c.check().unwrap();
}

/// Discarding without ever evicting keeps the list of discarded prefetches
/// within the slot count; they are still the ones evicted first.
#[test]
fn discards_stay_bounded_without_evictions() {
    let mut c = SlotCache::new(4, Box::new(Lru::new()));
    let Acquire::Miss(old) = demand(&mut c, 7, 0) else {
        panic!()
    };
    c.release(old);
    let mut guesses = Vec::new();
    for e in 0..3 {
        let Acquire::Miss(s) = c.prefetch(k(e), 1) else {
            panic!()
        };
        c.mark_ready(s);
        guesses.push(s);
    }
    for i in 0..if cfg!(miri) { 100 } else { 10_000 } {
        c.discard(guesses[i % 3]);
        c.discard(old); // a resident: ignored
        assert!(c.stale.len() <= 2 * 4 + 1, "{} entries", c.stale.len());
    }
    let Acquire::Miss(s) = demand(&mut c, 8, 2) else {
        panic!()
    };
    assert!(guesses.contains(&s), "a discarded guess made room");
    assert!(c.slot_of(k(7)).is_some(), "not LRU's oldest, resident 7");
    c.check().unwrap();
}

#[derive(Clone, Debug)]
enum Op {
    Demand(usize),
    Prefetch(usize),
    Complete(usize, bool),
    Release(usize),
    Evict(usize),
    Discard(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..12usize).prop_map(Op::Demand),
        (0..12usize).prop_map(Op::Prefetch),
        (0..8usize, any::<bool>()).prop_map(|(i, ok)| Op::Complete(i, ok)),
        (0..8usize).prop_map(Op::Release),
        (0..12usize).prop_map(Op::Evict),
        (0..8usize).prop_map(Op::Discard),
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
                Op::Discard(s) => c.discard(s % slots),
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

/// The token predictor: what a token id used at a layer before, shrunk
/// by half a sighting, averaged with cross-layer's estimate where that
/// exists; it guesses layers with no choice above them (a token's first
/// layer, layers further ahead) and nothing for a token it never met.
#[test]
fn token_layer_recalls_what_a_token_used() {
    let mut p = TokenLayer::new(3, 8);
    let mut out = Vec::new();
    let token = |p: &mut TokenLayer, id: Option<u32>, routes: [&[u32]; 3]| {
        p.begin_token(id);
        for (l, r) in routes.iter().enumerate() {
            p.observe(l, r);
        }
    };
    token(&mut p, Some(7), [&[1, 2], &[3], &[5, 6]]);
    token(&mut p, Some(8), [&[1, 0], &[4], &[0, 6]]);
    p.begin_token(Some(7));
    assert!(p.predicts_ahead());
    p.predict_scored(0, 4, &mut out);
    let mut got: Vec<u32> = out.iter().map(|x| x.0).collect();
    got.sort_unstable();
    assert_eq!(got, vec![1, 2], "{out:?}");
    assert!(
        out.iter().all(|x| (x.1 - 1.0 / 1.5).abs() < 1e-5),
        "{out:?}"
    );
    p.predict_scored(2, 4, &mut out);
    assert_eq!(out.len(), 2, "layer 2 from the token alone: {out:?}");
    // Layer 1 with layer 0 seen: expert 1 was followed by 3 once and 4
    // once (cross-layer 0.5 each); token 7 used 3 once (1/1.5).
    p.observe(0, &[1]);
    p.predict_scored(1, 4, &mut out);
    assert_eq!(out[0].0, 3);
    assert!((out[0].1 - (0.25 + 0.5 / 1.5)).abs() < 1e-3, "{out:?}");
    assert_eq!(out[1].0, 4);
    assert!((out[1].1 - 0.25).abs() < 1e-3, "{out:?}");
    // A token never met: nothing for its first layer.
    p.begin_token(Some(99));
    p.predict_scored(0, 4, &mut out);
    assert!(out.is_empty(), "{out:?}");
    // Unnamed tokens teach no token table.
    let mut q = TokenLayer::new(3, 8);
    for _ in 0..3 {
        for l in 0..3 {
            q.observe(l, &[l as u32]);
        }
    }
    q.begin_token(Some(7));
    q.predict_scored(0, 4, &mut out);
    assert!(out.is_empty(), "{out:?}");
}

/// The pair (previous id, id) is a second table: after 5 → 7 used
/// expert 2 and 6 → 7 used expert 3, the pair decides between them.
#[test]
fn token_layer_tells_pairs_apart() {
    let mut p = TokenLayer::new(1, 8);
    let mut out = Vec::new();
    for _ in 0..4 {
        for (a, e) in [(5, 2), (6, 3)] {
            p.begin_token(Some(a));
            p.observe(0, &[0]);
            p.begin_token(Some(7));
            p.observe(0, &[e]);
        }
    }
    for (a, e) in [(5, 2), (6, 3)] {
        p.begin_token(Some(a));
        p.observe(0, &[0]);
        p.begin_token(Some(7));
        p.predict_scored(0, 1, &mut out);
        assert_eq!(out[0].0, e, "after {a}: {out:?}");
    }
}

proptest! {
    /// Whatever the routes and ids, the token predictor's guesses are
    /// distinct experts of the model, at most m of them, with
    /// probabilities in (0, 1], most likely first.
    #[test]
    fn token_layer_scores_are_probabilities(
        toks in proptest::collection::vec((proptest::option::of(0u32..6), proptest::collection::vec(proptest::collection::vec(0u32..12, 0..4), 3)), 1..30),
        m in 1usize..6,
    ) {
        let mut p = TokenLayer::new(3, 10);
        let mut out = Vec::new();
        for (id, layers) in toks {
            p.begin_token(id);
            for (l, r) in layers.iter().enumerate() {
                p.predict_scored(l, m, &mut out);
                prop_assert!(out.len() <= m);
                prop_assert!(out.iter().all(|&(e, pr)| e < 10 && pr > 0.0 && pr <= 1.0 + 1e-6));
                prop_assert!(out.windows(2).all(|w| w[0].1 >= w[1].1));
                let mut d: Vec<u32> = out.iter().map(|x| x.0).collect();
                d.sort_unstable();
                d.dedup();
                prop_assert_eq!(d.len(), out.len());
                p.observe(l, r);
            }
        }
    }
}
