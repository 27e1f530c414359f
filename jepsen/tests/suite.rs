//! The short Jepsen run CI makes: 5 replicas and 2 agents in network namespaces, every nemesis at
//! least once, every workload (kill-during-launch and AWS calls of partitioned leaders included), healed, checked, reported. The long mode is in jepsen/README.md.

use std::process::Command;

#[test]
fn short_run_every_nemesis_every_workload() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/build-test-image.sh");
    assert!(Command::new("bash").arg(script).status().unwrap().success());
    let out_dir = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir())
        .join("test-artifacts/jepsen");
    let _ = std::fs::remove_dir_all(&out_dir);
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_titus-jepsen"));
    let bin_dir = exe.parent().unwrap();
    let out = Command::new(&exe)
        .args(["test", "--replicas", "5", "--time", "80s", "--fault", "3s", "--calm", "1s", "--nemesis", "all"])
        .args(["--workload", "register,set,observe,tasks,kill,aws", "--out", out_dir.to_str().unwrap()])
        .arg("--bin-dir")
        .arg(bin_dir)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "the run is valid:\n{text}");
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["valid"], true);
    let checks = results["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 6, "all six checkers ran");
    // The leader was cut off at least once, a new one seen leading, and the AWS calls watched.
    let fenced = checks.iter().find(|c| c["checker"].as_str().unwrap().starts_with("fenced")).unwrap();
    assert!(fenced["stats"]["partitions-with-a-new-leader"].as_u64().unwrap() >= 1, "{fenced}");
    let ran: Vec<&str> = results["nemesis"].as_array().unwrap().iter().map(|n| n[2].as_str().unwrap()).collect();
    for nemesis in titus_jepsen::nemesis::available(5) {
        assert!(ran.contains(&nemesis), "nemesis {nemesis} ran (ran: {ran:?})");
    }
    let events: Vec<&str> =
        results["run"]["nemesis_events"].as_array().unwrap().iter().map(|e| e["what"].as_str().unwrap()).collect();
    assert!(
        events.iter().any(|e| e.contains("added back: ok")),
        "the membership nemesis removed and re-added a replica: {events:?}"
    );
    let ops = &results["run"]["operations"];
    assert!(ops["ok"].as_u64().unwrap() > 1000, "{ops}");
    for f in ["index.html", "latency.svg", "throughput.svg", "history.edn", "history.json"] {
        assert!(out_dir.join(f).exists(), "{f}");
    }
}
