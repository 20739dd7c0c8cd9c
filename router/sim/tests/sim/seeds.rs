use swarmbus_sim::{run, Config};

/// Seeds CI runs on every change (about 7 s in a debug build on two cores); run many more
/// with `cargo run -p swarmbus-sim --release -- --seeds 10000`.
const CI_SEEDS: u64 = 100;

#[test]
fn bounded_seeds_pass_every_check() {
    for seed in 0..CI_SEEDS {
        if let Err(violation) = run(&Config::new(seed)) {
            panic!("{violation}");
        }
    }
}

#[test]
fn one_seed_replays_exactly() {
    let first = run(&Config::new(7)).expect("seed 7 passes");
    let second = run(&Config::new(7)).expect("seed 7 passes");
    assert_eq!(first, second);
}

#[test]
fn seeds_differ_and_exercise_every_path() {
    let a = run(&Config::new(1)).expect("seed 1 passes");
    let b = run(&Config::new(2)).expect("seed 2 passes");
    assert_ne!(a.trace_hash, b.trace_hash);
    let mut total = a.stats.clone();
    total.add(&b.stats);
    // A run that never crashes, fences or catches up checks little: each path is taken.
    for (what, count) in [
        ("acks", total.ops_acked),
        ("applies", total.ops_applied),
        ("duplicates dropped", total.duplicates_dropped),
        ("crashes", total.crashes),
        ("lost unsynced records", total.records_lost),
        ("lease grants", total.lease_grants),
        ("stamps accepted", total.stamps_accepted),
        ("stamps refused", total.stamps_refused),
        ("jobs finished", total.jobs_finished),
        ("dead letters", total.jobs_dead_lettered),
        ("fenced results", total.fenced_results),
        ("redeliveries", total.redeliveries),
        ("catch-up reads", total.catch_up_reads),
    ] {
        assert!(count > 0, "no {what} in two seeds: {total:?}");
    }
}
