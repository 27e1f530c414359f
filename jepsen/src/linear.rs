//! Linearizability checking: the Wing & Gong search with Lowe's memoization of (linearized set,
//! state) — the algorithm of Knossos's `wgl` and of Porcupine — over one key at a time (a register per
//! job is P-compositional: each key is checked alone).
//!
//! Why not the `porcupine-rs` crate: its 0.3 release takes criterion, crossbeam, regex and rand 0.10 as
//! normal dependencies, which on this 2-core machine can re-unify features under the AWS SDK and
//! rebuild it (25 minutes); and the checker is short. It is cross-checked against an exhaustive
//! search over every ordering on random small histories (`agrees_with_brute_force`).

use std::collections::HashSet;

/// One operation of a register: call and return times (`u64::MAX` for a return never seen).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegOp {
    pub call: u64,
    pub ret: u64,
    pub kind: RegKind,
    /// Its index in the history, for reports.
    pub id: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegKind {
    Write(i64),
    Read(i64),
}

fn step(state: i64, kind: RegKind) -> Option<i64> {
    match kind {
        RegKind::Write(v) => Some(v),
        RegKind::Read(v) => (v == state).then_some(state),
    }
}

/// The outcome for one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Linearizable,
    /// No order fits; `stuck_at` is the history index of the earliest return that no linearization
    /// could get past — where to look.
    NotLinearizable {
        stuck_at: u64,
    },
}

#[derive(Clone, Copy)]
struct Entry {
    op: usize,
    is_call: bool,
    time: u64,
}

/// Checks `ops` (of one key) against a register starting at `init`.
pub fn check(ops: &[RegOp], init: i64) -> Outcome {
    let n = ops.len();
    if n == 0 {
        return Outcome::Linearizable;
    }
    // Events by time; at equal times calls first (the more permissive reading).
    let mut events: Vec<Entry> = Vec::with_capacity(2 * n);
    for (i, o) in ops.iter().enumerate() {
        events.push(Entry { op: i, is_call: true, time: o.call });
        events.push(Entry { op: i, is_call: false, time: o.ret });
    }
    events.sort_by_key(|e| (e.time, !e.is_call));
    // A doubly linked list over the events, with a head sentinel at index len.
    let len = events.len();
    let head = len;
    let mut next: Vec<usize> = (1..=len).collect::<Vec<_>>();
    next.push(0);
    let mut prev: Vec<usize> = vec![0; len + 1];
    next[head] = 0;
    for i in 0..len {
        prev[i] = if i == 0 { head } else { i - 1 };
    }
    next[len - 1] = usize::MAX;
    let mut call_at = vec![0usize; n];
    let mut ret_at = vec![0usize; n];
    for (i, e) in events.iter().enumerate() {
        if e.is_call {
            call_at[e.op] = i;
        } else {
            ret_at[e.op] = i;
        }
    }
    let unlink = |i: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = nx;
        if nx != usize::MAX {
            prev[nx] = p;
        }
    };
    let relink = |i: usize, next: &mut Vec<usize>, prev: &mut Vec<usize>| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = i;
        if nx != usize::MAX {
            prev[nx] = i;
        }
    };
    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, i64)> = HashSet::new();
    let mut stack: Vec<(usize, i64)> = Vec::new();
    let mut state = init;
    let mut entry = next[head];
    let mut deepest_return = None;
    while next[head] != usize::MAX {
        let e = events[entry];
        if e.is_call {
            if let Some(new_state) = step(state, ops[e.op].kind) {
                linearized[e.op / 64] |= 1 << (e.op % 64);
                if cache.insert((linearized.clone(), new_state)) {
                    stack.push((e.op, state));
                    state = new_state;
                    // Lift the call and its return out of the list.
                    unlink(call_at[e.op], &mut next, &mut prev);
                    unlink(ret_at[e.op], &mut next, &mut prev);
                    entry = next[head];
                    continue;
                }
                linearized[e.op / 64] &= !(1 << (e.op % 64));
            }
            entry = next[entry];
        } else {
            // A return whose operation is not linearized yet: back up.
            let at = ops[e.op].id;
            deepest_return = Some(deepest_return.map_or(at, |d: u64| d.max(at)));
            let Some((op, old_state)) = stack.pop() else {
                return Outcome::NotLinearizable { stuck_at: deepest_return.unwrap_or(at) };
            };
            state = old_state;
            linearized[op / 64] &= !(1 << (op % 64));
            relink(ret_at[op], &mut next, &mut prev);
            relink(call_at[op], &mut next, &mut prev);
            entry = next[call_at[op]];
        }
        if entry == usize::MAX {
            // Past the end with calls left that cannot go first: only possible after a backtrack
            // exhausted this level.
            let Some((op, old_state)) = stack.pop() else {
                return Outcome::NotLinearizable { stuck_at: deepest_return.unwrap_or(0) };
            };
            state = old_state;
            linearized[op / 64] &= !(1 << (op % 64));
            relink(ret_at[op], &mut next, &mut prev);
            relink(call_at[op], &mut next, &mut prev);
            entry = next[call_at[op]];
        }
    }
    Outcome::Linearizable
}

/// Exhaustive search over every order that respects real time: the oracle of the tests.
pub fn brute_force(ops: &[RegOp], init: i64) -> bool {
    fn go(ops: &[RegOp], done: &mut Vec<bool>, state: i64, left: usize) -> bool {
        if left == 0 {
            return true;
        }
        for i in 0..ops.len() {
            if done[i] {
                continue;
            }
            // i may go next only if no pending op returned before i was called.
            if (0..ops.len()).any(|j| !done[j] && j != i && ops[j].ret < ops[i].call) {
                continue;
            }
            if let Some(s) = step(state, ops[i].kind) {
                done[i] = true;
                if go(ops, done, s, left - 1) {
                    return true;
                }
                done[i] = false;
            }
        }
        // Operations that never returned may be left out (they never took effect).
        let pending_only = (0..ops.len()).filter(|i| !done[*i]).all(|i| ops[i].ret == u64::MAX);
        pending_only
    }
    go(ops, &mut vec![false; ops.len()], init, ops.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(call: u64, ret: u64, v: i64) -> RegOp {
        RegOp { call, ret, kind: RegKind::Write(v), id: call }
    }
    fn r(call: u64, ret: u64, v: i64) -> RegOp {
        RegOp { call, ret, kind: RegKind::Read(v), id: call }
    }

    #[test]
    fn known_histories() {
        // Concurrent write and reads: both old and new values are fine.
        assert_eq!(check(&[w(0, 10, 1), r(1, 2, 0), r(3, 4, 1)], 0), Outcome::Linearizable);
        // A stale read after the write returned.
        assert!(matches!(check(&[w(0, 10, 1), r(11, 12, 0)], 0), Outcome::NotLinearizable { .. }));
        // A read that goes back in time.
        assert!(matches!(check(&[w(0, 1, 1), w(2, 3, 2), r(4, 5, 2), r(6, 7, 1)], 0), Outcome::NotLinearizable { .. }));
        // An unknown write may take effect any time later...
        assert_eq!(check(&[w(0, u64::MAX, 7), r(5, 6, 0), r(8, 9, 7)], 0), Outcome::Linearizable);
        // ...but once seen, it cannot be undone.
        assert!(matches!(check(&[w(0, u64::MAX, 7), r(5, 6, 7), r(8, 9, 0)], 0), Outcome::NotLinearizable { .. }));
    }

    fn op() -> impl Strategy<Value = (u64, u64, bool, i64, bool)> {
        (0u64..20, 1u64..8, any::<bool>(), 0i64..3, prop::bool::weighted(0.15))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        #[test]
        fn agrees_with_brute_force(raw in prop::collection::vec(op(), 1..7)) {
            let ops: Vec<RegOp> = raw.iter().enumerate().map(|(i, (call, len, write, v, unknown))| RegOp {
                call: *call * 2,
                ret: if *unknown && *write { u64::MAX } else { *call * 2 + *len * 2 - 1 },
                kind: if *write { RegKind::Write(*v) } else { RegKind::Read(*v) },
                id: i as u64,
            }).collect();
            prop_assert_eq!(check(&ops, 0) == Outcome::Linearizable, brute_force(&ops, 0), "{:?}", ops);
        }
    }
}
