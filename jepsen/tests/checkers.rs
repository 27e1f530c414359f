//! The checkers must be able to fail: broken histories, written to files as another tool would,
//! are fed to `titus-jepsen check`, and each anomaly is reported (exit code 1) — while the same
//! histories without the fault pass (exit code 0).

use std::process::Command;

fn check(name: &str, text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    let report = dir.path().join("report");
    let out = Command::new(env!("CARGO_BIN_EXE_titus-jepsen"))
        .args(["check", path.to_str().unwrap(), "--out", report.to_str().unwrap()])
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{name}:\n{text}");
    if out.status.code() != Some(2) {
        for f in ["index.html", "latency.svg", "throughput.svg", "results.json", "history.edn", "history.json"] {
            assert!(report.join(f).exists(), "{f} written");
        }
    }
    (out.status.code().unwrap_or(-1), text)
}

/// A register history in Jepsen's EDN layout; `last_read` is what the final read returned.
fn register_edn(last_read: i64) -> String {
    format!(
        r#"{{:type :invoke, :f :write, :value ["k" 1], :process 0, :time 0, :index 0}}
{{:type :ok, :f :write, :value ["k" 1], :process 0, :time 10, :index 1}}
{{:type :invoke, :f :write, :value ["k" 2], :process 1, :time 20, :index 2}}
{{:type :info, :f :write, :value ["k" 2], :process 1, :time 90, :index 3, :error "timeout"}}
{{:type :invoke, :f :read, :value ["k" nil], :process 0, :time 30, :index 4}}
{{:type :ok, :f :read, :value ["k" 1], :process 0, :time 40, :index 5}}
{{:type :invoke, :f :write, :value ["k" 3], :process 0, :time 50, :index 6}}
{{:type :ok, :f :write, :value ["k" 3], :process 0, :time 60, :index 7}}
{{:type :invoke, :f :read, :value ["k" nil], :process 2, :time 70, :index 8}}
{{:type :ok, :f :read, :value ["k" {last_read}], :process 2, :time 80, :index 9}}
"#
    )
}

#[test]
fn stale_read_is_reported() {
    // 3 is current; 2 is a write of unknown outcome that may land late: both are fine.
    assert_eq!(check("ok.edn", &register_edn(3)).0, 0);
    assert_eq!(check("late.edn", &register_edn(2)).0, 0);
    // 1 was overwritten by 3 before the read began: a stale read.
    let (code, out) = check("stale.edn", &register_edn(1));
    assert_eq!(code, 1);
    assert!(out.contains("INVALID linearizable register") && out.contains("key k: not linearizable"), "{out}");
}

fn set_json(final_read: &str) -> String {
    format!(
        r#"[
  {{"index":0,"time":0,"process":0,"type":"invoke","f":"add","value":"t1"}},
  {{"index":1,"time":5,"process":0,"type":"ok","f":"add","value":["t1","job-a"]}},
  {{"index":2,"time":6,"process":1,"type":"invoke","f":"add","value":"t2"}},
  {{"index":3,"time":9,"process":1,"type":"ok","f":"add","value":["t2","job-b"]}},
  {{"index":4,"time":10,"process":1000,"type":"invoke","f":"read-all","value":null}},
  {{"index":5,"time":12,"process":1000,"type":"ok","f":"read-all","value":{final_read}}}
]"#
    )
}

#[test]
fn lost_and_duplicated_submissions_are_reported() {
    assert_eq!(check("set.json", &set_json(r#"[["t1","job-a"],["t2","job-b"]]"#)).0, 0);
    let (code, out) = check("lost.json", &set_json(r#"[["t1","job-a"]]"#));
    assert_eq!(code, 1);
    assert!(out.contains("lost: t2 was acknowledged as job job-b"), "{out}");
    let (code, out) = check("dup.json", &set_json(r#"[["t1","job-a"],["t2","job-b"],["t2","job-c"]]"#));
    assert_eq!(code, 1);
    assert!(out.contains("duplicate: token t2 maps to 2 jobs"), "{out}");
}

fn observe_edn(second_observer: &[(u64, &str)]) -> String {
    let mut s = String::new();
    let mut i = 0;
    let mut push = |observer: u64, revision: u64, kind: &str, id: &str| {
        s.push_str(&format!(
            "{{:type :ok, :f :observe, :process {}, :time {i}, :index {i}, :value {{:observer {observer}, :revision {revision}, :kind \"{kind}\", :id \"{id}\", :state \"s\", :resumed false}}}}\n",
            10_000 + observer
        ));
        i += 1;
    };
    push(0, 5, "snapshot-end", "");
    for (r, id) in [(6, "a"), (7, "b"), (8, "c")] {
        push(0, r, "job", id);
    }
    push(1, 5, "snapshot-end", "");
    for (r, id) in second_observer {
        push(1, *r, "job", id);
    }
    s
}

#[test]
fn observer_gaps_are_reported() {
    assert_eq!(check("same.edn", &observe_edn(&[(6, "a"), (7, "b"), (8, "c")])).0, 0);
    let (code, out) = check("gap.edn", &observe_edn(&[(6, "a"), (8, "c")]));
    assert_eq!(code, 1);
    assert!(out.contains("observers 0 and 1 differ"), "{out}");
    let (code, out) = check("order.edn", &observe_edn(&[(7, "b"), (6, "a"), (8, "c")]));
    assert_eq!(code, 1);
    assert!(out.contains("out of order"), "{out}");
}

#[test]
fn a_fresh_snapshot_after_a_reconnect_is_not_a_gap() {
    // Observer 1's stream broke after revision 7 and started over with a snapshot read at 9: the
    // snapshot's items (revision 9) come before its marker, then live changes go on.
    let mut text = observe_edn(&[(6, "a"), (7, "b")]);
    let mut i = 100;
    for (revision, kind, id) in [(9, "job", "a"), (9, "job", "c"), (9, "snapshot-end", ""), (10, "job", "d")] {
        text.push_str(&format!(
            "{{:type :ok, :f :observe, :process 10001, :time {i}, :index {i}, :value {{:observer 1, :revision {revision}, :kind \"{kind}\", :id \"{id}\", :state \"s\", :resumed false}}}}\n"
        ));
        i += 1;
    }
    text.push_str("{:type :ok, :f :observe, :process 10000, :time 200, :index 200, :value {:observer 0, :revision 10, :kind \"job\", :id \"d\", :state \"s\"}}\n");
    let (code, out) = check("fresh.edn", &text);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn a_task_in_two_containers_is_reported() {
    let history = |rows: &str| {
        format!(
            r#"[
  {{"index":0,"time":0,"process":20000,"type":"invoke","f":"submit","value":null}},
  {{"index":1,"time":5,"process":20000,"type":"ok","f":"submit","value":"job-a"}},
  {{"index":2,"time":6,"process":30000,"type":"ok","f":"containers","value":{rows}}},
  {{"index":3,"time":9,"process":30001,"type":"invoke","f":"tasks","value":null}},
  {{"index":4,"time":9,"process":30001,"type":"ok","f":"tasks","value":[["task-1","job-a","Finished"]]}}
]"#
        )
    };
    assert_eq!(check("one.json", &history(r#"[["task-1","c1","agent-1"]]"#)).0, 0);
    let (code, out) = check("two.json", &history(r#"[["task-1","c1","agent-1"],["task-1","c2","agent-2"]]"#));
    assert_eq!(code, 1);
    assert!(out.contains("task task-1 runs in 2 containers"), "{out}");
}

#[test]
fn unreadable_histories_are_clear_errors() {
    let (code, out) = check("bad.edn", "{:type :bogus, :f :read, :process 0}");
    assert_eq!(code, 2);
    assert!(out.contains(":bogus"), "{out}");
}
