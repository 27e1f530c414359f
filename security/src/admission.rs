//! Who may hold a connection to a listener. Connections cost nothing to open and a slot each to
//! hold, so one anonymous client could once fill a port's limit with connections that never made a
//! call (4,096 idle TLS connections, and the port answered nobody). Here:
//!
//! - a connection is *unauthenticated* from its accept until it makes its first authenticated call
//!   ([`Admission::authenticated`]: a certificate, not revoked, or a known token);
//! - an unauthenticated connection is closed once `unauthenticated_timeout` has passed since its
//!   accept;
//! - at most `max_unauthenticated_per_address` unauthenticated connections per source address, and
//!   at most `max_connections - reserved_for_authenticated` in all: one more *evicts* the oldest
//!   one over the bound, preferring one whose handshake is done (it had its chance to make a
//!   call) to one still shaking hands — so a newcomer, say an admin behind the same address as a
//!   flood, always gets in and is never the first to go;
//! - when every slot is held, the oldest unauthenticated connection makes room; only when all are
//!   authenticated is a new connection refused.
//!
//! Every refusal, eviction and timeout is counted in [`ListenerStats`].
//!
//! Invariant: `GateState::open` counts the admitted connections that are neither dropped nor
//! evicted, and each of them is unauthenticated exactly when its id is in `by_address` and in one of
//! `handshaking` / `idle`. Every transition (admit, handshaken, authenticated, evicted, timed out,
//! dropped) happens under the gate's one lock, so no connection is counted twice or lost.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// Bounds on what peers can make a listener hold.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// Of those, how many only authenticated connections may hold.
    pub reserved_for_authenticated: usize,
    /// Unauthenticated connections from one source address at most.
    pub max_unauthenticated_per_address: usize,
    /// From its accept, how long a connection has to authenticate (handshake included).
    pub unauthenticated_timeout: Duration,
    /// The handshake requires a client certificate (no bearer tokens on this port).
    pub require_client_cert: bool,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            max_connections: 4096,
            reserved_for_authenticated: 512,
            max_unauthenticated_per_address: 256,
            unauthenticated_timeout: Duration::from_secs(5),
            require_client_cert: false,
        }
    }
}

impl ListenerLimits {
    fn max_unauthenticated(&self) -> usize {
        self.max_connections.saturating_sub(self.reserved_for_authenticated).max(1)
    }
}

/// A listener's admission counters (gauges and totals), for metrics.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Connections held now.
    pub open: AtomicU64,
    /// Of those, unauthenticated now.
    pub unauthenticated: AtomicU64,
    /// New connections refused because every slot was held by an authenticated one.
    pub refused: AtomicU64,
    /// Unauthenticated connections closed to admit a newer one (per address or over the reserve).
    pub evicted: AtomicU64,
    /// Unauthenticated connections closed at their timeout.
    pub timed_out: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshaking,
    /// Handshake done, no authenticated call yet.
    Idle,
    Authenticated,
    /// Evicted or timed out: no longer counted; the connection closes at its next poll.
    Closed,
}

/// One admitted connection's shared state.
struct Slot {
    id: u64,
    address: IpAddr,
    /// Lock-free fast path for the connection's IO once authenticated.
    authenticated: AtomicBool,
    closed: AtomicBool,
    /// The task to wake when the connection is closed from outside (eviction).
    waker: Mutex<Option<Waker>>,
}

struct GateState {
    open: usize,
    next_id: u64,
    phase: HashMap<u64, Phase>,
    handshaking: BTreeMap<u64, Arc<Slot>>,
    idle: BTreeMap<u64, Arc<Slot>>,
    by_address: HashMap<IpAddr, BTreeSet<u64>>,
}

/// A listener's admission: shared by its accept loop and every connection it admitted.
pub struct Gate {
    limits: ListenerLimits,
    stats: Arc<ListenerStats>,
    state: Mutex<GateState>,
}

impl Gate {
    pub fn new(limits: ListenerLimits, stats: Arc<ListenerStats>) -> Arc<Gate> {
        Arc::new(Gate {
            limits,
            stats,
            state: Mutex::new(GateState {
                open: 0,
                next_id: 0,
                phase: HashMap::new(),
                handshaking: BTreeMap::new(),
                idle: BTreeMap::new(),
                by_address: HashMap::new(),
            }),
        })
    }

    pub fn limits(&self) -> &ListenerLimits {
        &self.limits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a connection from `address`, evicting older unauthenticated ones over the bounds;
    /// None (counted) when every slot is held by an authenticated connection.
    pub fn admit(self: &Arc<Gate>, address: IpAddr) -> Option<Admission> {
        let mut s = self.lock();
        if s.open >= self.limits.max_connections && !self.evict(&mut s, None) {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if s.by_address.get(&address).map_or(0, BTreeSet::len) >= self.limits.max_unauthenticated_per_address {
            self.evict(&mut s, Some(address));
        }
        if s.handshaking.len() + s.idle.len() >= self.limits.max_unauthenticated() {
            self.evict(&mut s, None);
        }
        let id = s.next_id;
        s.next_id += 1;
        let slot = Arc::new(Slot {
            id,
            address,
            authenticated: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            waker: Mutex::new(None),
        });
        s.open += 1;
        s.phase.insert(id, Phase::Handshaking);
        s.handshaking.insert(id, slot.clone());
        s.by_address.entry(address).or_default().insert(id);
        self.publish(&s);
        Some(Admission { gate: self.clone(), slot, deadline: None, owner: true })
    }

    /// Closes the oldest unauthenticated connection (from `address`, when given), preferring one
    /// whose handshake is done. False when there is none.
    fn evict(&self, s: &mut GateState, address: Option<IpAddr>) -> bool {
        let victim = match address {
            Some(a) => {
                let ids = s.by_address.get(&a);
                let oldest_idle = ids.and_then(|ids| ids.iter().find(|id| s.idle.contains_key(id)).copied());
                oldest_idle.or_else(|| ids.and_then(|ids| ids.first().copied()))
            }
            None => s.idle.keys().next().or_else(|| s.handshaking.keys().next()).copied(),
        };
        let Some(id) = victim else { return false };
        self.close(s, id);
        self.stats.evicted.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Takes unauthenticated connection `id` out of the count and tells it to close.
    fn close(&self, s: &mut GateState, id: u64) {
        let Some(slot) = Self::unlist(s, id) else { return };
        s.phase.insert(id, Phase::Closed);
        s.open -= 1;
        slot.closed.store(true, Ordering::Release);
        let waker = slot.waker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Removes an unauthenticated connection from the lists (not from `open`).
    fn unlist(s: &mut GateState, id: u64) -> Option<Arc<Slot>> {
        let slot = s.handshaking.remove(&id).or_else(|| s.idle.remove(&id))?;
        if let Some(ids) = s.by_address.get_mut(&slot.address) {
            ids.remove(&id);
            if ids.is_empty() {
                s.by_address.remove(&slot.address);
            }
        }
        Some(slot)
    }

    fn publish(&self, s: &GateState) {
        self.stats.open.store(s.open as u64, Ordering::Relaxed);
        self.stats.unauthenticated.store((s.handshaking.len() + s.idle.len()) as u64, Ordering::Relaxed);
    }
}

/// An admitted connection's hold on its slot. The accept loop owns the first one (dropping it
/// frees the slot); clones ride in every request's [`crate::PeerInfo`] so that the first
/// authenticated call can say so.
pub struct Admission {
    gate: Arc<Gate>,
    slot: Arc<Slot>,
    /// Only the connection's own hold has one: when it fires unauthenticated, the connection closes.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The connection's own hold (not a request's handle): dropping it frees the slot.
    owner: bool,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").field("id", &self.slot.id).field("address", &self.slot.address).finish()
    }
}

impl Clone for Admission {
    /// A handle for requests: it neither frees the slot when dropped nor times the connection out.
    fn clone(&self) -> Self {
        Admission { gate: self.gate.clone(), slot: self.slot.clone(), deadline: None, owner: false }
    }
}

impl Admission {
    /// Starts the connection's clock: unauthenticated past `unauthenticated_timeout` from now, it
    /// closes. Called on the connection's own hold, at accept.
    pub fn start_clock(&mut self) {
        let timeout = self.gate.limits.unauthenticated_timeout;
        self.deadline = Some(Box::pin(tokio::time::sleep(timeout)));
    }

    /// The handshake is done: the connection may now be evicted before one still shaking hands.
    pub fn handshaken(&self) {
        let mut s = self.gate.lock();
        if s.phase.get(&self.slot.id) == Some(&Phase::Handshaking) {
            if let Some(slot) = s.handshaking.remove(&self.slot.id) {
                s.idle.insert(self.slot.id, slot);
            }
            s.phase.insert(self.slot.id, Phase::Idle);
        }
    }

    /// The connection proved who it is (an authenticated call): it is no longer timed out or
    /// evicted. Idempotent, and cheap once done.
    pub fn authenticated(&self) {
        if self.slot.authenticated.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.gate.lock();
        if matches!(s.phase.get(&self.slot.id), Some(Phase::Handshaking | Phase::Idle)) {
            Gate::unlist(&mut s, self.slot.id);
            s.phase.insert(self.slot.id, Phase::Authenticated);
            self.slot.authenticated.store(true, Ordering::Release);
            self.gate.publish(&s);
        }
    }

    /// Ready with the reason when the connection must close (evicted, or unauthenticated at its
    /// deadline); registers to be woken for either. Cheap once authenticated.
    pub fn poll_closed(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if self.slot.authenticated.load(Ordering::Acquire) {
            self.deadline = None;
            return Poll::Pending;
        }
        *self.slot.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        if self.slot.closed.load(Ordering::Acquire) {
            return Poll::Ready(io::Error::new(io::ErrorKind::ConnectionAborted, "closed for a newer connection"));
        }
        if let Some(d) = self.deadline.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                self.deadline = None;
                let mut s = self.gate.lock();
                if matches!(s.phase.get(&self.slot.id), Some(Phase::Handshaking | Phase::Idle)) {
                    self.gate.close(&mut s, self.slot.id);
                    self.gate.stats.timed_out.fetch_add(1, Ordering::Relaxed);
                    self.gate.publish(&s);
                    return Poll::Ready(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no authenticated call in time after connecting",
                    ));
                }
            }
        }
        Poll::Pending
    }

    /// Resolves when the connection must close: for racing a handshake against.
    pub fn closed(&mut self) -> impl Future<Output = io::Error> + '_ {
        std::future::poll_fn(move |cx| self.poll_closed(cx))
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if !self.owner {
            return;
        }
        let mut s = self.gate.lock();
        match s.phase.remove(&self.slot.id) {
            Some(Phase::Handshaking | Phase::Idle) => {
                Gate::unlist(&mut s, self.slot.id);
                s.open -= 1;
            }
            Some(Phase::Authenticated) => s.open -= 1,
            Some(Phase::Closed) | None => {}
        }
        self.gate.publish(&s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: usize, reserved: usize, per_address: usize) -> ListenerLimits {
        ListenerLimits {
            max_connections: max,
            reserved_for_authenticated: reserved,
            max_unauthenticated_per_address: per_address,
            unauthenticated_timeout: Duration::from_secs(60),
            require_client_cert: false,
        }
    }

    fn addr(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    fn closed(a: &Admission) -> bool {
        a.slot.closed.load(Ordering::Acquire)
    }

    #[test]
    fn one_address_over_its_bound_loses_its_oldest_idle_connection_first() {
        let stats = Arc::new(ListenerStats::default());
        let gate = Gate::new(limits(100, 10, 2), stats.clone());
        let shaking = gate.admit(addr(1)).unwrap();
        let idle = gate.admit(addr(1)).unwrap();
        idle.handshaken();
        let newest = gate.admit(addr(1)).unwrap();
        assert!(closed(&idle), "the handshaken, call-less connection goes first");
        assert!(!closed(&shaking) && !closed(&newest));
        // Another address is not touched by this one's bound.
        let other = gate.admit(addr(2)).unwrap();
        assert!(!closed(&other));
        let _fourth = gate.admit(addr(1)).unwrap();
        assert!(closed(&shaking), "then the oldest still shaking hands");
        assert_eq!(stats.evicted.load(Ordering::Relaxed), 2);
        assert_eq!(stats.open.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn authenticated_connections_are_never_evicted_and_hold_the_reserve() {
        let stats = Arc::new(ListenerStats::default());
        let gate = Gate::new(limits(4, 2, 100), stats.clone());
        let a = gate.admit(addr(1)).unwrap();
        let b = gate.admit(addr(2)).unwrap();
        // Two unauthenticated at most (4 minus 2 reserved): a third evicts the oldest.
        let c = gate.admit(addr(3)).unwrap();
        assert!(closed(&a) && !closed(&b) && !closed(&c));
        b.clone().authenticated();
        c.authenticated();
        assert_eq!(stats.unauthenticated.load(Ordering::Relaxed), 0);
        let d = gate.admit(addr(4)).unwrap();
        d.authenticated();
        let e = gate.admit(addr(5)).unwrap();
        e.authenticated();
        // All four slots held by authenticated connections: a newcomer is refused, nobody evicted.
        assert!(gate.admit(addr(6)).is_none());
        assert_eq!(stats.refused.load(Ordering::Relaxed), 1);
        assert!(!closed(&b) && !closed(&c) && !closed(&d) && !closed(&e));
        // A request's handle dropping frees nothing; the connection's own hold does.
        drop(b.clone());
        assert_eq!(stats.open.load(Ordering::Relaxed), 4);
        drop(b);
        assert_eq!(stats.open.load(Ordering::Relaxed), 3);
        assert!(gate.admit(addr(6)).is_some());
    }

    #[test]
    fn a_full_listener_makes_room_by_closing_an_unauthenticated_connection() {
        let stats = Arc::new(ListenerStats::default());
        let gate = Gate::new(limits(2, 0, 100), stats.clone());
        let a = gate.admit(addr(1)).unwrap();
        a.authenticated();
        let b = gate.admit(addr(2)).unwrap();
        let c = gate.admit(addr(3)).unwrap();
        assert!(closed(&b) && !closed(&a) && !closed(&c));
        // The evicted connection's hold dropping later does not free a second slot.
        drop(b);
        assert_eq!(stats.open.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn an_unauthenticated_connection_closes_at_its_deadline_and_an_authenticated_one_never() {
        let stats = Arc::new(ListenerStats::default());
        let mut l = limits(10, 0, 10);
        l.unauthenticated_timeout = Duration::from_millis(50);
        let gate = Gate::new(l, stats.clone());
        let mut silent = gate.admit(addr(1)).unwrap();
        silent.start_clock();
        let mut caller = gate.admit(addr(1)).unwrap();
        caller.start_clock();
        caller.clone().authenticated();
        let e = tokio::time::timeout(Duration::from_secs(10), silent.closed()).await.expect("closed at its deadline");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(stats.timed_out.load(Ordering::Relaxed), 1);
        assert_eq!(stats.open.load(Ordering::Relaxed), 1);
        // Well past the deadline, the authenticated one is still open.
        let waited = tokio::time::timeout(Duration::from_millis(200), caller.closed()).await;
        assert!(waited.is_err(), "an authenticated connection was closed");
    }
}
