use super::*;

fn synthetic(tokens: usize, layers: usize, experts: u32, k: usize, seed: u64) -> Trace {
    let mut rng = seed | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let steps = (0..tokens)
        .map(|t| Step {
            pos: t,
            token: Some(t as u32),
            decode: t >= tokens / 4,
            layers: (0..layers)
                .map(|_| {
                    // Skewed popularity: low ids are chosen more often.
                    let mut ex: Vec<u32> = Vec::new();
                    while ex.len() < k {
                        let a = (next() % experts as u64) as u32;
                        let b = (next() % experts as u64) as u32;
                        let e = a.min(b);
                        if !ex.contains(&e) {
                            ex.push(e);
                        }
                    }
                    Some(LayerRoute {
                        weights: vec![1.0 / k as f32; k],
                        experts: ex,
                    })
                })
                .collect(),
        })
        .collect();
    Trace {
        model_id: "synthetic".into(),
        layers,
        experts: experts as usize,
        top_k: k,
        steps,
    }
}

#[test]
#[cfg_attr(
    miri,
    ignore = "replays every policy, Belady and predictor: many minutes under Miri"
)]
fn belady_bounds_every_demand_policy() {
    for seed in 1..6 {
        let t = synthetic(120, 3, 24, 4, seed);
        for decode_only in [false, true] {
            let s = stats(
                &t,
                &StatsOptions {
                    slots: vec![4, 8, 12],
                    decode_only,
                    expert_bytes: 1000,
                    seed: Vec::new(),
                },
            );
            for n in ["4", "8", "12"] {
                let b = s["policies"]["belady"][n].as_f64().unwrap();
                assert!(b > 0.0 && b <= 1.0);
                for p in POLICIES {
                    let h = s["policies"][*p][n].as_f64().unwrap();
                    assert!(h <= b + 1e-12, "{p} {h} beats Belady {b} at {n} slots");
                }
            }
            // More slots never lower Belady's hit rate.
            let b4 = s["policies"]["belady"]["4"].as_f64().unwrap();
            let b12 = s["policies"]["belady"]["12"].as_f64().unwrap();
            assert!(b12 >= b4);
        }
    }
}

#[test]
#[cfg_attr(
    miri,
    ignore = "replays every policy, Belady and predictor: minutes under Miri"
)]
fn lru_matches_a_reference_simulation() {
    let t = synthetic(80, 2, 16, 3, 9);
    let s = stats(
        &t,
        &StatsOptions {
            slots: vec![5],
            decode_only: false,
            expert_bytes: 0,
            seed: Vec::new(),
        },
    );
    let (mut hits, mut uses) = (0, 0);
    for l in 0..2 {
        let mut order: Vec<u32> = Vec::new(); // most recent last
        for st in &t.steps {
            let r = st.layers[l].as_ref().unwrap();
            // Residents are looked up first (then they are safe from the
            // step's own misses), then the misses, each in listed order.
            let mut step: Vec<u32> = r.experts.clone();
            step.sort_by_key(|e| !order.contains(e));
            for &e in &step {
                uses += 1;
                if let Some(i) = order.iter().position(|&x| x == e) {
                    hits += 1;
                    order.remove(i);
                } else if order.len() == 5 {
                    // Evict the least recent not used in this step.
                    let i = order.iter().position(|x| !r.experts.contains(x)).unwrap();
                    order.remove(i);
                }
                order.push(e);
            }
        }
    }
    let want = hits as f64 / uses as f64;
    let got = s["policies"]["lru"]["5"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-12, "lru {got} vs reference {want}");
}

#[test]
fn json_round_trips_and_csv_imports() {
    let t = synthetic(10, 2, 8, 2, 3);
    let j = t.to_json().to_string();
    let back = Trace::from_json(j.as_bytes(), Path::new("t.json")).unwrap();
    assert_eq!(back, t);
    let csv = "layer,expert\n0,3\n0,5\n1,2\n1,7\n0,1\n0,4\n1,0\n1,6\n";
    let c = Trace::from_csv(csv, Path::new("t.csv")).unwrap();
    assert_eq!(c.steps.len(), 2);
    assert_eq!(c.layers, 2);
    assert_eq!(c.top_k, 2);
    assert_eq!(c.steps[1].layers[1].as_ref().unwrap().experts, vec![0, 6]);
}

#[test]
fn hostile_traces_are_refused() {
    let p = Path::new("x.json");
    let cases = [
        r#"{"meta":{"num_layers":2,"num_experts":4},"routes":[{"layers":{"0":{"experts":[9]}}}]}"#,
        r#"{"meta":{"num_layers":2,"num_experts":4},"routes":[{"layers":{"7":{"experts":[1]}}}]}"#,
        r#"{"meta":{"num_layers":99999999,"num_experts":4},"routes":[]}"#,
        r#"{"meta":{"num_layers":2,"num_experts":4}}"#,
        r#"{"routes":[]}"#,
        r#"{"meta":{"num_layers":1,"num_experts":2},"routes":[{"layers":{"0":{"experts":[0,1,0]}}}]}"#,
        // Nothing to replay: no token, or no expert chosen anywhere.
        r#"{"meta":{"num_layers":2,"num_experts":4},"routes":[]}"#,
        r#"{"meta":{"num_layers":2,"num_experts":4},"routes":[{"layers":{}},{"layers":{"1":{"experts":[]}}}]}"#,
    ];
    for c in cases {
        let e = Trace::from_json(c.as_bytes(), p).unwrap_err().to_string();
        assert!(e.contains("x.json"), "{e}");
    }
    assert!(Trace::from_csv("0,1\n0,x\n", p).is_err());
    assert!(Trace::from_csv("", p).is_err());
}

/// On the recorded traces (when they are beside the repository), the
/// figures the trace README states: LRU about 36-42% and Belady about
/// 60-66% with 16 slots per layer over decode tokens.
#[test]
#[cfg_attr(miri, ignore = "reads megabytes of recorded traces from disk")]
fn recorded_traces_match_their_readme() {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/traces/qwen1.5-moe-a2.7b");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        eprintln!("skipped: no recorded traces at {}", dir.display());
        return;
    };
    for f in rd.flatten() {
        let t = Trace::open(&f.path()).unwrap();
        let s = stats(
            &t,
            &StatsOptions {
                slots: vec![16],
                decode_only: true,
                expert_bytes: 0,
                seed: Vec::new(),
            },
        );
        let lru = s["policies"]["lru"]["16"].as_f64().unwrap();
        let bel = s["policies"]["belady"]["16"].as_f64().unwrap();
        assert!((0.30..0.47).contains(&lru), "{:?}: lru {lru}", f.path());
        assert!((0.54..0.70).contains(&bel), "{:?}: belady {bel}", f.path());
    }
}
