//! Linearizability checking: the Wing & Gong search with Lowe's memoization of (linearized set,
//! state) — the algorithm of Knossos's `wgl` and of Porcupine — over one key at a time (a register per
//! key is P-compositional: each key is checked alone). The register holds values interned to small
//! ids by the caller (`checks::register`), so the search works on `u32`s whatever the values are.
//!
//! Three things keep the search small and bounded:
//! - operations of unknown outcome (`info`) whose written value nobody observes are dropped before the
//!   search ([`prune`]): leaving them out is always allowed and never needed;
//! - an unknown-outcome write or cas is only linearized when an operation that observes its value
//!   could be linearized right after it (otherwise it could as well never have happened), so the
//!   search does not try every subset of them at every point;
//! - the memo holds 128-bit hashes of configurations (16 bytes each, no bitset per entry), and is
//!   capped ([`Limits`]): when the cap or the deadline is reached the answer is
//!   [`Outcome::GaveUp`], never an out-of-memory or a guess.
//!
//! Why not the `porcupine-rs` crate: its 0.3 release takes criterion, crossbeam, regex and rand 0.10 as
//! normal dependencies, which on this 2-core machine can re-unify features under the AWS SDK and
//! rebuild it (25 minutes); and the checker is short. It is cross-checked against an exhaustive
//! search over every ordering on random small histories (`agrees_with_brute_force`).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::Instant;

/// One operation of a register: call and return times (`u64::MAX` for a return never seen: an
/// operation of unknown outcome, which may take effect at any time after its call, or never).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegOp<V = u32> {
    pub call: u64,
    pub ret: u64,
    pub kind: RegKind<V>,
    /// Its index in the history, for reports.
    pub id: u64,
}

impl<V> RegOp<V> {
    pub fn pending(&self) -> bool {
        self.ret == u64::MAX
    }
}

/// What an operation does to the register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegKind<V = u32> {
    Write(V),
    Read(V),
    /// Compare-and-set: `(old, new)`; takes effect only if the register holds `old`.
    Cas(V, V),
}

impl<V: Clone + PartialEq> RegKind<V> {
    /// The state after this operation from `state`, or `None` if it cannot happen there.
    pub fn step(&self, state: &V) -> Option<V> {
        match self {
            RegKind::Write(v) => Some(v.clone()),
            RegKind::Read(v) => (v == state).then(|| state.clone()),
            RegKind::Cas(old, new) => (old == state).then(|| new.clone()),
        }
    }

    /// The value the register must hold for this operation to happen.
    pub fn observes(&self) -> Option<&V> {
        match self {
            RegKind::Write(_) => None,
            RegKind::Read(v) | RegKind::Cas(v, _) => Some(v),
        }
    }

    /// The value this operation leaves in the register, if it changes it.
    pub fn writes(&self) -> Option<&V> {
        match self {
            RegKind::Read(_) => None,
            RegKind::Write(v) | RegKind::Cas(_, v) => Some(v),
        }
    }
}

/// The outcome for one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Linearizable,
    /// No order fits; `stuck_at` is the history index of the latest return that no linearization
    /// could get past — where to look.
    NotLinearizable {
        stuck_at: u64,
    },
    /// The search reached a limit before it could decide.
    GaveUp {
        reason: String,
    },
}

/// How far one key's search may go.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Configurations remembered (16 bytes each, plus the hash table's slack: 4 M is about 140 MB).
    pub max_configs: usize,
    /// When to stop, whatever the memo size.
    pub deadline: Option<Instant>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_configs: 4_000_000, deadline: None }
    }
}

/// Figures of one search.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Operations dropped before the search (unknown outcome, value never observed).
    pub pruned: usize,
    /// Configurations remembered at the end (the memo's peak: nothing is ever evicted).
    pub configs: usize,
    /// Steps of the search (linearizations tried, backtracks).
    pub steps: u64,
}

/// Checks `ops` (of one key) against a register starting at `init`, with the default limits.
pub fn check(ops: &[RegOp], init: u32) -> Outcome {
    check_with(ops, init, &Limits::default()).0
}

/// Checks `ops` (of one key) against a register starting at `init`.
pub fn check_with(ops: &[RegOp], init: u32, limits: &Limits) -> (Outcome, Stats) {
    let kept = prune(ops);
    let pruned = ops.len() - kept.len();
    let (outcome, mut stats) = Search::new(&kept, init, limits).run();
    stats.pruned = pruned;
    (outcome, stats)
}

/// Drops the operations of unknown outcome whose written value no remaining operation observes,
/// until none is left to drop.
///
/// Sound and complete: leaving out an unknown operation is always allowed, and if a linearization
/// includes one whose value `v` nobody observes, then the operations between it and the next state
/// change all find the register holding `v` — so there are none (any read or cas there would observe
/// `v`), and removing it leaves a valid linearization. Removing an unknown cas can leave its `old`
/// value unobserved in turn, hence the fixpoint.
pub fn prune(ops: &[RegOp]) -> Vec<RegOp> {
    let mut keep = vec![true; ops.len()];
    loop {
        let mut observers: HashMap<u32, usize> = HashMap::new();
        for (o, _) in ops.iter().zip(&keep).filter(|(_, k)| **k) {
            if let Some(v) = o.kind.observes() {
                *observers.entry(*v).or_default() += 1;
            }
        }
        let mut changed = false;
        for (o, k) in ops.iter().zip(keep.iter_mut()) {
            let unobserved = o.kind.writes().is_some_and(|v| !observers.contains_key(v));
            if *k && o.pending() && unobserved {
                *k = false;
                changed = true;
            }
        }
        if !changed {
            return ops.iter().zip(&keep).filter(|(_, k)| **k).map(|(o, _)| *o).collect();
        }
    }
}

/// A call or a return in the time-ordered event list.
#[derive(Clone, Copy)]
struct Event {
    op: usize,
    is_call: bool,
    time: u64,
}

const NIL: usize = usize::MAX;

/// The memo's hasher: its keys are already uniformly random 128-bit hashes, so half of one is the
/// hash.
#[derive(Default)]
struct Fold(u64);

impl Hasher for Fold {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

/// A Zobrist key: a pseudo-random 128-bit value for each (stream, index), from splitmix64.
fn zobrist(stream: u64, i: u64) -> u128 {
    fn splitmix(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }
    let seed = splitmix(stream.wrapping_mul(0x632b_e59b_d9b4_e019) ^ i);
    (u128::from(splitmix(seed)) << 64) | u128::from(splitmix(seed ^ 0xd1b5_4a32_d192_ed03))
}

/// The search over one key's operations.
///
/// The memo holds, per configuration visited, `hash(linearized set) XOR hash(state)`: the set's hash
/// is the XOR of one random 128-bit key per linearized operation, updated in O(1) as operations are
/// linearized and undone. Exact keys would need the bitset (n/8 bytes per entry, cloned per insert:
/// gigabytes on a 1,000-op history). A collision — two different configurations with one hash —
/// would make the search skip a configuration it never explored, which can only turn "linearizable"
/// into "not linearizable" (a false alarm, never a missed anomaly); with 128-bit keys its probability
/// is below entries² / 2¹²⁸, under 10⁻²⁴ for the largest memo allowed.
struct Search<'a> {
    ops: &'a [RegOp],
    init: u32,
    limits: &'a Limits,
    events: Vec<Event>,
    /// A doubly linked list over the events, head sentinel at index `events.len()`.
    next: Vec<usize>,
    prev: Vec<usize>,
    call_at: Vec<usize>,
    ret_at: Vec<usize>,
    op_keys: Vec<u128>,
}

impl<'a> Search<'a> {
    fn new(ops: &'a [RegOp], init: u32, limits: &'a Limits) -> Search<'a> {
        let n = ops.len();
        // Events by time; at equal times calls first (the more permissive reading).
        let mut events: Vec<Event> = Vec::with_capacity(2 * n);
        for (i, o) in ops.iter().enumerate() {
            events.push(Event { op: i, is_call: true, time: o.call });
            events.push(Event { op: i, is_call: false, time: o.ret });
        }
        events.sort_by_key(|e| (e.time, !e.is_call));
        let len = events.len();
        let mut next: Vec<usize> = (1..=len).collect();
        if let Some(last) = next.last_mut() {
            *last = NIL;
        }
        next.push(if len == 0 { NIL } else { 0 });
        let mut prev: Vec<usize> = (0..len).map(|i| if i == 0 { len } else { i - 1 }).collect();
        prev.push(NIL);
        let mut call_at = vec![0usize; n];
        let mut ret_at = vec![0usize; n];
        for (i, e) in events.iter().enumerate() {
            if e.is_call {
                call_at[e.op] = i;
            } else {
                ret_at[e.op] = i;
            }
        }
        let op_keys = (0..n as u64).map(|i| zobrist(1, i)).collect();
        Search { ops, init, limits, events, next, prev, call_at, ret_at, op_keys }
    }

    fn head(&self) -> usize {
        self.events.len()
    }

    fn unlink(&mut self, i: usize) {
        let (p, nx) = (self.prev[i], self.next[i]);
        self.next[p] = nx;
        if nx != NIL {
            self.prev[nx] = p;
        }
    }

    fn relink(&mut self, i: usize) {
        let (p, nx) = (self.prev[i], self.next[i]);
        self.next[p] = i;
        if nx != NIL {
            self.prev[nx] = i;
        }
    }

    /// Whether some operation other than `skip` that observes `value` could be linearized now: its
    /// call is in the list before the first return still there.
    fn observer_callable(&self, value: u32, skip: usize) -> bool {
        let mut e = self.next[self.head()];
        while e != NIL && self.events[e].is_call {
            let op = self.events[e].op;
            if op != skip && self.ops[op].kind.observes() == Some(&value) {
                return true;
            }
            e = self.next[e];
        }
        false
    }

    fn run(mut self) -> (Outcome, Stats) {
        let ops = self.ops;
        let head = self.head();
        let state_key = |s: u32| zobrist(2, u64::from(s));
        let mut cache: HashSet<u128, BuildHasherDefault<Fold>> = HashSet::default();
        let mut stats = Stats::default();
        // (op linearized, the state before it)
        let mut stack: Vec<(usize, u32)> = Vec::new();
        let mut state = self.init;
        let mut linearized: u128 = 0;
        // Operations with a return that are not linearized yet: the search is done at 0, whatever
        // the unknown operations left.
        let mut remaining = ops.iter().filter(|o| !o.pending()).count();
        let mut entry = self.next[head];
        let mut deepest_return: Option<u64> = None;
        loop {
            if remaining == 0 {
                stats.configs = cache.len();
                return (Outcome::Linearizable, stats);
            }
            stats.steps += 1;
            if stats.steps % 4096 == 0 && self.limits.deadline.is_some_and(|d| Instant::now() >= d) {
                stats.configs = cache.len();
                let reason = format!("time limit reached after {} configurations", cache.len());
                return (Outcome::GaveUp { reason }, stats);
            }
            // The list always holds an unlinearized return while `remaining > 0`, and a scan stops at
            // the first return; `NIL` is a safeguard.
            let e = if entry == NIL { None } else { Some(self.events[entry]) };
            match e {
                Some(e) if e.is_call => {
                    let op = &ops[e.op];
                    let next_config = op.kind.step(&state).map(|s| (s, linearized ^ self.op_keys[e.op] ^ state_key(s)));
                    let fresh = next_config
                        .filter(|(s, key)| !cache.contains(key) && (!op.pending() || self.observer_callable(*s, e.op)));
                    let Some((new_state, key)) = fresh else {
                        entry = self.next[entry];
                        continue;
                    };
                    if cache.len() >= self.limits.max_configs {
                        stats.configs = cache.len();
                        let reason = format!("search gave up after {} configurations (the limit)", cache.len());
                        return (Outcome::GaveUp { reason }, stats);
                    }
                    cache.insert(key);
                    stack.push((e.op, state));
                    state = new_state;
                    linearized ^= self.op_keys[e.op];
                    remaining -= usize::from(!op.pending());
                    // Lift the call and its return out of the list.
                    self.unlink(self.call_at[e.op]);
                    self.unlink(self.ret_at[e.op]);
                    entry = self.next[head];
                }
                _ => {
                    // A return whose operation is not linearized yet: back up.
                    if let Some(e) = e {
                        let at = ops[e.op].id;
                        deepest_return = Some(deepest_return.map_or(at, |d| d.max(at)));
                    }
                    let Some((op, old_state)) = stack.pop() else {
                        stats.configs = cache.len();
                        return (Outcome::NotLinearizable { stuck_at: deepest_return.unwrap_or(0) }, stats);
                    };
                    state = old_state;
                    linearized ^= self.op_keys[op];
                    remaining += usize::from(!ops[op].pending());
                    self.relink(self.ret_at[op]);
                    self.relink(self.call_at[op]);
                    entry = self.next[self.call_at[op]];
                }
            }
        }
    }
}

/// Exhaustive search over every order that respects real time, on values of any type: the oracle of
/// the tests. Operations that never returned may be left out.
pub fn brute_force<V: Clone + PartialEq>(ops: &[RegOp<V>], init: &V) -> bool {
    fn go<V: Clone + PartialEq>(ops: &[RegOp<V>], done: &mut Vec<bool>, state: &V) -> bool {
        if (0..ops.len()).all(|i| done[i] || ops[i].pending()) {
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
            if let Some(s) = ops[i].kind.step(state) {
                done[i] = true;
                if go(ops, done, &s) {
                    return true;
                }
                done[i] = false;
            }
        }
        false
    }
    go(ops, &mut vec![false; ops.len()], init)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(call: u64, ret: u64, v: u32) -> RegOp {
        RegOp { call, ret, kind: RegKind::Write(v), id: call }
    }
    fn r(call: u64, ret: u64, v: u32) -> RegOp {
        RegOp { call, ret, kind: RegKind::Read(v), id: call }
    }
    fn cas(call: u64, ret: u64, old: u32, new: u32) -> RegOp {
        RegOp { call, ret, kind: RegKind::Cas(old, new), id: call }
    }
    const NEVER: u64 = u64::MAX;

    #[test]
    fn known_histories() {
        // Concurrent write and reads: both old and new values are fine.
        assert_eq!(check(&[w(0, 10, 1), r(1, 2, 0), r(3, 4, 1)], 0), Outcome::Linearizable);
        // A stale read after the write returned.
        assert!(matches!(check(&[w(0, 10, 1), r(11, 12, 0)], 0), Outcome::NotLinearizable { .. }));
        // A read that goes back in time.
        assert!(matches!(check(&[w(0, 1, 1), w(2, 3, 2), r(4, 5, 2), r(6, 7, 1)], 0), Outcome::NotLinearizable { .. }));
        // An unknown write may take effect any time later...
        assert_eq!(check(&[w(0, NEVER, 7), r(5, 6, 0), r(8, 9, 7)], 0), Outcome::Linearizable);
        // ...but once seen, it cannot be undone.
        assert!(matches!(check(&[w(0, NEVER, 7), r(5, 6, 7), r(8, 9, 0)], 0), Outcome::NotLinearizable { .. }));
    }

    #[test]
    fn compare_and_set() {
        // cas 0→4 then read 4.
        assert_eq!(check(&[cas(0, 1, 0, 4), r(2, 3, 4)], 0), Outcome::Linearizable);
        // A cas from a stale value: 1 was overwritten by 2 before the cas began.
        let stale = check(&[w(0, 1, 1), w(2, 3, 2), cas(4, 5, 1, 3)], 0);
        assert_eq!(stale, Outcome::NotLinearizable { stuck_at: 4 });
        // An unknown cas that cannot ever apply must not be forced in: 9 is never the state.
        assert_eq!(check(&[cas(0, NEVER, 9, 1), r(2, 3, 0)], 0), Outcome::Linearizable);
        // An unknown cas may apply late, enabled by an unknown write: 0 →w5→ 5 →cas→ 7.
        assert_eq!(check(&[w(0, NEVER, 5), cas(1, NEVER, 5, 7), r(10, 11, 7)], 0), Outcome::Linearizable);
        // The prune keeps the write of 5: the unknown cas observes it.
        assert_eq!(prune(&[w(0, NEVER, 5), cas(1, NEVER, 5, 7), r(10, 11, 7)]).len(), 3);
        // ...but drops both when 7 is never read.
        assert_eq!(prune(&[w(0, NEVER, 5), cas(1, NEVER, 5, 7), r(10, 11, 0)]).len(), 1);
    }

    #[test]
    fn limits_give_up_rather_than_guess() {
        let ops = [w(0, 10, 1), w(0, 10, 2), r(1, 2, 1), r(3, 4, 2), r(11, 12, 3)];
        let (out, stats) = check_with(&ops, 0, &Limits { max_configs: 2, deadline: None });
        assert!(matches!(out, Outcome::GaveUp { .. }), "{out:?}");
        assert_eq!(stats.configs, 2);
        let (out, _) = check_with(&ops, 0, &Limits::default());
        assert!(matches!(out, Outcome::NotLinearizable { .. }), "{out:?}");
        let past = Limits { max_configs: usize::MAX, deadline: Some(Instant::now()) };
        let many: Vec<RegOp> = (0..5000).map(|i| w(i, i + 2, (i % 3) as u32)).chain([r(6000, 6001, 9)]).collect();
        assert!(matches!(check_with(&many, 0, &past).0, Outcome::GaveUp { .. }));
    }

    /// (call slot, length, kind 0 read / 1 write / 2 cas, a, b, unknown outcome)
    fn op() -> impl Strategy<Value = (u64, u64, u8, u32, u32, bool)> {
        (0u64..20, 1u64..8, 0u8..3, 0u32..3, 0u32..3, prop::bool::weighted(0.2))
    }

    fn build(raw: &[(u64, u64, u8, u32, u32, bool)]) -> Vec<RegOp> {
        raw.iter()
            .enumerate()
            .map(|(i, (call, len, kind, a, b, unknown))| RegOp {
                call: *call * 2,
                // Reads of unknown outcome are dropped by the checker, so never generated.
                ret: if *unknown && *kind != 0 { NEVER } else { *call * 2 + *len * 2 - 1 },
                kind: match kind {
                    0 => RegKind::Read(*a),
                    1 => RegKind::Write(*a),
                    _ => RegKind::Cas(*a, *b),
                },
                id: i as u64,
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        #[test]
        fn agrees_with_brute_force(raw in prop::collection::vec(op(), 1..8)) {
            let ops = build(&raw);
            let expected = brute_force(&ops, &0);
            prop_assert_eq!(check(&ops, 0) == Outcome::Linearizable, expected, "{:?}", ops);
            // With a tiny memo it may give up, but never answers wrong.
            match check_with(&ops, 0, &Limits { max_configs: 3, deadline: None }).0 {
                Outcome::GaveUp { .. } => {}
                out => prop_assert_eq!(out == Outcome::Linearizable, expected, "capped: {:?}", ops),
            }
        }
    }
}
