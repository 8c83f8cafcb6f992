//! A smoke run of keel-bench (issue: the benchmark tool must keep working): every workload with
//! small totals against one Keel member; each must report its requests done and no error.
//! Throughput is not looked at here (no timed assertions); `scripts/bench-compare.sh` measures.

mod common;

use common::*;
use std::process::Command;

fn bench_bin() -> std::path::PathBuf {
    let p = keel_bin().with_file_name("keel-bench");
    assert!(p.exists(), "{} missing: build the workspace (cargo build --release)", p.display());
    p
}

fn run(endpoint: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(bench_bin())
        .env("RUST_BACKTRACE", "0")
        .args(["--endpoints", endpoint, "--json"])
        .args(args)
        .output()
        .expect("run keel-bench");
    assert!(out.status.success(), "keel-bench {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("keel-bench {args:?}: bad JSON ({e}): {text}"))
}

#[test]
fn every_workload_runs_against_keel() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = start(&keel_bin(), &tmp.path().join("bench.etcd"), free_port(), free_port(), &[]);
    assert!(p.wait_ready(), "{}", p.log_text());
    let ep = p.endpoint();
    let cases: Vec<(Vec<&str>, u64)> = vec![
        (vec!["--clients", "4", "--conns", "2", "put", "--total", "200", "--key-space-size", "50", "--val-size", "64"], 200),
        (vec!["--clients", "4", "range", "00000001", "--total", "200", "--consistency", "l"], 200),
        (vec!["--clients", "4", "range", "0", "9", "--total", "100", "--consistency", "s", "--count-only"], 100),
        (vec!["--clients", "4", "--target-leader", "txn-put", "--total", "100", "--key-space-size", "10"], 100),
        (vec!["--clients", "2", "txn-mixed", "--total", "100", "--key-space-size", "10", "--rw-ratio", "2"], 100),
        (vec!["--clients", "2", "lease-keepalive", "--total", "100"], 100),
        (vec!["put", "--total", "50", "--rate", "500", "--sequential-keys", "--key-space-size", "50"], 50),
        // 2 streams x 3 watchers on 2 keys, 20 puts: every watcher sees the puts of its key.
        (
            vec![
                "watch-latency",
                "--streams",
                "2",
                "--watchers-per-stream",
                "3",
                "--watched-key-total",
                "2",
                "--put-total",
                "20",
                "--put-rate",
                "200",
            ],
            60,
        ),
    ];
    for (args, ops) in cases {
        let j = run(&ep, &args);
        assert_eq!(j["errors"], 0, "{args:?}: {j}");
        assert_eq!(j["ops"].as_u64(), Some(ops), "{args:?}: {j}");
    }
}
