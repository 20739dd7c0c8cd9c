//! The checks can fail: a model step broken on purpose is caught, with the seed.

use swarmbus_sim::{run, Config, Fault};

fn with_fault(seed: u64, fault: Fault) -> Config {
    Config {
        fault: Some(fault),
        ..Config::new(seed)
    }
}

#[test]
fn a_durable_record_lost_at_a_crash_is_caught() {
    for seed in 0..4 {
        let violation = run(&with_fault(seed, Fault::LoseDurableRecord))
            .expect_err("losing a durable record must break an invariant");
        assert!(
            violation.invariant.contains("lost") || violation.invariant.contains("durable"),
            "seed {seed}: {violation}"
        );
        let report = violation.to_string();
        assert!(report.contains(&format!("--seed {seed}")), "{report}");
        assert!(
            report.contains(&format!("step {}", violation.step)),
            "{report}"
        );
    }
}

#[test]
fn a_skipped_fencing_check_is_caught() {
    for seed in 0..4 {
        let violation = run(&with_fault(seed, Fault::SkipStampCheck))
            .expect_err("accepting stale stamps must break an invariant");
        assert!(
            violation.invariant.contains("stale fencing token"),
            "seed {seed}: {violation}"
        );
    }
}
