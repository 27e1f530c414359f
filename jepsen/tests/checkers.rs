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

/// A history from `tests/fixtures/`, in the layouts Jepsen's own tests of other systems write.
fn fixture(name: &str) -> (i32, String) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    check(name, &std::fs::read_to_string(&path).unwrap())
}

#[test]
fn jepsen_histories_of_other_systems_are_read() {
    // etcd-style `jepsen.independent` tuples with integer keys, reads of nil, cas that succeed and
    // fail, cas of unknown outcome, nemesis ops with any values.
    let (code, out) = fixture("etcd-independent-cas.edn");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("cas-ok 1") && out.contains("cas-fail 1") && out.contains("cas-info 2"), "{out}");
    // `#jepsen.history.Op{...}` records, one register with plain values, ratios, bigints and chars in
    // a nemesis value.
    let (code, out) = fixture("zookeeper-records.edn");
    assert_eq!(code, 0, "{out}");
    // Keys and values of any type (maps, sets, vectors, characters), `#_` discarded forms.
    let (code, out) = fixture("any-values.edn");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("keys 2"), "{out}");
}

#[test]
fn a_cas_from_a_stale_value_is_reported() {
    // Key 0: 1 was overwritten by 2 before the cas 1→5 began, yet the cas succeeded. Key 1 is fine.
    let (code, out) = fixture("etcd-independent-stale-cas.edn");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("key 0: not linearizable") && !out.contains("key 1: not"), "{out}");
    assert!(out.contains("ok cas [0 [1 5]] at index 5"), "{out}");
}

#[test]
fn without_time_the_order_of_the_history_is_the_order_in_time() {
    // write 1 completes, then a read sees the initial nil: a stale read, found only when the lines'
    // order is taken as real time (with every time 0 all four ops would be concurrent).
    let (code, out) = fixture("no-time.edn");
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("the register: not linearizable"), "{out}");
}

#[test]
fn operations_no_checker_understands_are_not_skipped() {
    let (code, out) = fixture("unknown-f.edn");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(":append: 2 ops not checked") && out.contains(":txn: 2 ops not checked"), "{out}");
    // A history with reads only is no register history: reported, not passed.
    let reads =
        "{:type :invoke, :f :read, :process 0, :time 1}\n{:type :ok, :f :read, :value [1 2], :process 0, :time 2}\n";
    let (code, out) = check("reads.edn", reads);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("needs a :write or :cas"), "{out}");
}

/// A register history made by simulating a linearizable register: `procs` clients each run
/// operations one after another; each takes effect at a random instant inside its interval, and
/// reads and cas see the state there. `unknown` of the writes end `info` (their client gives up and
/// goes on as a new process); half of those took effect, half never did.
fn simulated(n: usize, procs: u64, unknown: usize, seed: u64) -> Vec<titus_jepsen::history::Op> {
    use serde_json::json;
    use titus_jepsen::history::{Op, Type};
    let mut s = seed;
    let mut rnd = move |m: u64| {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 33) % m
    };
    // (process, f, arg, call, effect, ret, info)
    struct Plan {
        process: i64,
        f: &'static str,
        a: u64,
        b: u64,
        call: u64,
        effect: u64,
        ret: u64,
        info: bool,
    }
    let mut clock = vec![0u64; procs as usize];
    let mut ids: Vec<i64> = (0..procs as i64).collect();
    let mut next_id = procs as i64;
    let mut infos = 0;
    let mut plans = Vec::new();
    for i in 0..n {
        let p = rnd(procs) as usize;
        // The unknown writes spread over the history.
        let info = infos < unknown && i % (n / unknown).max(1) == 0;
        let f = if info { "write" } else { ["read", "write", "cas"][rnd(3) as usize] };
        let call = clock[p] + rnd(20);
        let effect = call + 1 + rnd(30);
        let ret = effect + 1 + rnd(30);
        infos += usize::from(info);
        plans.push(Plan { process: ids[p], f, a: rnd(5), b: rnd(5), call, effect, ret, info });
        clock[p] = ret + 1;
        if info {
            ids[p] = next_id;
            next_id += 1;
        }
    }
    // Apply in effect order.
    let mut order: Vec<usize> = (0..plans.len()).collect();
    order.sort_by_key(|i| plans[*i].effect);
    let mut state: Option<u64> = None;
    let mut results = vec![(Type::Ok, json!(null)); plans.len()];
    for (k, i) in order.into_iter().enumerate() {
        let p = &plans[i];
        results[i] = match p.f {
            "read" => (Type::Ok, json!(state)),
            "write" if p.info => {
                if k % 2 == 0 {
                    state = Some(p.a);
                }
                (Type::Info, json!(p.a))
            }
            "write" => {
                state = Some(p.a);
                (Type::Ok, json!(p.a))
            }
            _ if state == Some(p.a) => {
                state = Some(p.b);
                (Type::Ok, json!([p.a, p.b]))
            }
            _ => (Type::Fail, json!([p.a, p.b])),
        };
    }
    let mut events: Vec<(u64, Op)> = Vec::new();
    for (p, (kind, done_value)) in plans.iter().zip(results) {
        let invoked = match p.f {
            "read" => json!(null),
            "write" => json!(p.a),
            _ => json!([p.a, p.b]),
        };
        let op = |time, kind, value| Op { index: 0, time, process: p.process, kind, f: p.f.into(), value, error: None };
        events.push((p.call, op(p.call, Type::Invoke, invoked)));
        // An unknown write's client gives up long after: its interval stays open to the end.
        let ret = if kind == Type::Info { p.ret + 1_000_000 } else { p.ret };
        events.push((ret, op(ret, kind, done_value)));
    }
    events.sort_by_key(|(t, _)| *t);
    events
        .into_iter()
        .enumerate()
        .map(|(i, (_, mut op))| {
            op.index = i as u64;
            op
        })
        .collect()
}

#[test]
fn the_search_stays_bounded_on_a_long_history_with_unknown_writes() {
    use titus_jepsen::checks::{check_all, Options, Verdict};
    // 1,000 operations, 40 of them writes of unknown outcome, 5 values: the kind of history that
    // took the previous checker 4 GB and over 300 s.
    let ops = simulated(1000, 8, 40, 7);
    let infos = ops.iter().filter(|o| o.kind == titus_jepsen::history::Type::Info).count();
    assert_eq!(infos, 40);
    let mut opts = Options::default();
    opts.limits.max_configs = 1_000_000;
    let started = std::time::Instant::now();
    let results = check_all(&ops, &opts);
    let elapsed = started.elapsed();
    let register = &results[0];
    eprintln!("{:?} in {elapsed:?}: {:?} {:?}", register.valid, register.stats, register.unchecked);
    assert_eq!(Verdict::merge(&results), Verdict::Valid, "{:?}", results);
    assert!(register.stats["peak-configurations"] < 1_000_000);

    // The same history with one read returning a value never written is not linearizable. Found
    // early in the history, the search proves it at once; found at the very end, proving it means
    // exhausting every configuration before it, and the search may reach its cap: then the answer
    // is "unknown", within the bound — never "valid".
    let ok_reads: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| o.f == "read" && o.kind == titus_jepsen::history::Type::Ok)
        .map(|(i, _)| i)
        .collect();
    let mut early = ops.clone();
    early[ok_reads[20]].value = serde_json::json!(99);
    let results = check_all(&early, &opts);
    eprintln!("early: {:?}: {:?}", results[0].valid, results[0].stats);
    assert_eq!(Verdict::merge(&results), Verdict::Invalid, "{:?}", results);
    let mut late = ops.clone();
    late[*ok_reads.last().unwrap()].value = serde_json::json!(99);
    let results = check_all(&late, &opts);
    eprintln!("late: {:?}: {:?}", results[0].valid, results[0].stats);
    assert_ne!(Verdict::merge(&results), Verdict::Valid, "{:?}", results);
    assert!(results[0].stats["peak-configurations"] <= 1_000_000);
}

/// A kill-during-launch history: job-a launched and killed at 1 s, its task t-a; `during` and
/// `after` are the containers seen at 70 s (60 s after the kill) and after healing.
fn kill_history(during: &str, after: &str) -> String {
    format!(
        r#"[
  {{"index":0,"time":0,"process":50000,"type":"invoke","f":"launch","value":null}},
  {{"index":1,"time":500000000,"process":50000,"type":"ok","f":"launch","value":"job-a"}},
  {{"index":2,"time":600000000,"process":50000,"type":"invoke","f":"kill","value":"job-a"}},
  {{"index":3,"time":1000000000,"process":50000,"type":"ok","f":"kill","value":"job-a"}},
  {{"index":4,"time":1100000000,"process":30000,"type":"ok","f":"containers","value":[["t-a","c1","agent-1"]]}},
  {{"index":5,"time":70000000000,"process":30000,"type":"ok","f":"containers","value":{during}}},
  {{"index":6,"time":80000000000,"process":30002,"type":"invoke","f":"killed-tasks","value":null}},
  {{"index":7,"time":80000000001,"process":30002,"type":"ok","f":"killed-tasks","value":[["t-a","job-a","Finished"]]}},
  {{"index":8,"time":80500000000,"process":30003,"type":"fail","f":"containers-final","value":null,"error":"docker ps: timeout"}},
  {{"index":9,"time":81000000000,"process":30003,"type":"ok","f":"containers-final","value":{after}}}
]"#
    )
}

#[test]
fn a_container_running_for_a_killed_task_is_reported() {
    // Running just after the kill is fine; gone later and after healing.
    let (code, out) = check("killed.json", &kill_history("[]", "[]"));
    assert_eq!(code, 0, "{out}");
    let (code, out) = check("late.json", &kill_history(r#"[["t-a","c1","agent-1"]]"#, "[]"));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("task t-a of job job-a runs in container c1 on agent-1 69 s after its kill"), "{out}");
    let (code, out) = check("after.json", &kill_history("[]", r#"[["t-a","c2","agent-2"]]"#));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("after healing: task t-a of killed job job-a runs in container c2 on agent-2"), "{out}");
    // With no successful final sample, nothing is known.
    let text = kill_history("[]", "[]")
        .replace(r#""type":"ok","f":"containers-final""#, r#""type":"fail","f":"containers-final""#);
    let (code, out) = check("unsampled.json", &text);
    assert_eq!(code, 2, "{out}");
}

/// Replica 1 leads, is cut off at 1 s; replica 2 is seen leading (term 6) at 2 s; the partition is
/// healed at 5 s. `late` is what replica 1 calls at 3 s.
fn fenced_history(late: &str) -> String {
    let s = 1_000_000_000u64;
    let mut ops = vec![
        (0, r#""process":"nemesis","type":"invoke","f":"start","value":"partition-isolate-leader""#.to_string()),
        (s, r#""process":"nemesis","type":"info","f":"start","value":["partition-isolate-leader","partition isolate-leader [1✗2,3]",[1]]"#.into()),
        (s / 2, r#""process":60001,"type":"ok","f":"leader","value":[1,1,5]"#.into()),
        (s + 1, r#""process":61001,"type":"ok","f":"aws-call","value":[1,"TerminateInstances",true]"#.into()),
        (2 * s, r#""process":60002,"type":"ok","f":"leader","value":[2,2,6]"#.into()),
        (2 * s + 5, r#""process":61002,"type":"ok","f":"aws-call","value":[2,"RunInstances",true]"#.into()),
        (3 * s, format!(r#""process":61001,"type":"ok","f":"aws-call","value":[1,"{late}",{}]"#, !late.starts_with("Describe"))),
        (5 * s, r#""process":"nemesis","type":"invoke","f":"stop","value":"partition-isolate-leader""#.into()),
        (6 * s, r#""process":"nemesis","type":"info","f":"stop","value":"partition-isolate-leader""#.into()),
        (7 * s, r#""process":61001,"type":"ok","f":"aws-call","value":[1,"RunInstances",true]"#.into()),
    ];
    ops.sort_by_key(|(t, _)| *t);
    let lines: Vec<String> =
        ops.iter().enumerate().map(|(i, (t, rest))| format!(r#"{{"index":{i},"time":{t},{rest}}}"#)).collect();
    format!("[{}]", lines.join(",\n"))
}

#[test]
fn an_aws_mutation_from_a_deposed_leader_is_reported() {
    // Reads from the cut-off leader, its mutations before the new leader was seen and after the
    // heal, and the new leader's: all fine.
    let (code, out) = check("fenced.json", &fenced_history("DescribeInstances"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("partitions-with-a-new-leader 1"), "{out}");
    let (code, out) = check("unfenced.json", &fenced_history("TerminateInstances"));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("replica 1, cut off by partition-isolate-leader, called TerminateInstances 1000 ms after replica 2 was seen leading (term 6)"),
        "{out}"
    );
}
