//! The process-wide instance pool: live persona instances follow activity.
//!
//! A bot holds an instance of its persona only while it needs one. Every
//! [`Sandbox`](super::Sandbox) has a *seat* in the one [`InstancePool`] its
//! [`Runtime`](super::Runtime) owns; the pool holds at most `capacity` live instances
//! (`[runtime] pool_instances`), counting both instances in the middle of a call and
//! idle ones kept warm.
//!
//! - **A call** takes the seat's warm instance back from the pool if it is still
//!   there, or else a *slot* ([`InstancePool::acquire`]) and instantiates. While the
//!   call runs the instance belongs to the sandbox alone: nothing can reclaim it.
//! - **After a call** the instance goes back to the pool, idle and warm
//!   ([`InstancePool::put_idle`]), unless the call failed (then it is dropped and the
//!   next call gets a fresh one).
//! - **A full pool** reclaims the least recently used idle instance of another seat
//!   (dropping it frees its slot); when every slot is in the middle of a call, the
//!   caller waits, first come first served, for the next slot to be freed or the
//!   next instance to go idle, up to the call's wall-clock limit; then the call
//!   fails with [`PoolTimeout`].
//! - **Idle instances expire** after `[runtime] instance_idle_secs` (a task on the
//!   tokio runtime sweeps them, on tokio's clock).
//!
//! So a persona's memory (its linear memory, globals, anything its language keeps
//! between calls) can be gone before any message: what must last belongs in `kv`.
//!
//! The pool is generic over what it holds so that its bookkeeping can be tested
//! without WebAssembly; the runtime's pool holds [`Instance`](super::sandbox::Instance)s.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Identifies one user of the pool (one sandbox).
pub type SeatId = u64;

/// A call waited for a slot as long as it may (its wall-clock limit) and got none.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "no instance slot became free within {} s: all {capacity} instances of the pool were in the middle of calls (raise [runtime] pool_instances)",
    waited.as_secs_f64()
)]
pub struct PoolTimeout {
    pub capacity: usize,
    pub waited: Duration,
}

/// A point-in-time view of the pool.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    /// Live instances the pool allows (`[runtime] pool_instances`).
    pub capacity: usize,
    /// Live instances now: in a call (or being created) plus idle.
    pub live: usize,
    /// Live instances in the middle of a call (or being created).
    pub in_use: usize,
    /// Live instances idle and warm (reclaimable).
    pub idle: usize,
    /// Calls waiting for a slot right now.
    pub waiting: usize,
    /// The most live instances there ever were at once.
    pub peak_live: usize,
    /// Slots handed out (each became a new instance, or was meant to).
    pub acquired: u64,
    /// Idle instances dropped to make room for another seat's call.
    pub reclaimed: u64,
    /// Idle instances dropped because they were idle too long.
    pub expired: u64,
    /// Acquisitions that found every slot in a call and had to wait.
    pub waits: u64,
    /// Waits that ended without a slot (the call failed with [`PoolTimeout`]).
    pub wait_timeouts: u64,
    /// Instances the pooling allocator refused and on-demand allocation created.
    pub on_demand: u64,
}

/// One live instance's place in the pool. Dropping it frees the place (for the
/// first waiter, if any).
#[must_use = "dropping a slot frees it"]
pub struct Slot<T> {
    pool: Option<Weak<Shared<T>>>,
}

impl<T> std::fmt::Debug for Slot<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").finish_non_exhaustive()
    }
}

impl<T> Drop for Slot<T> {
    fn drop(&mut self) {
        if let Some(shared) = self.pool.take().and_then(|w| w.upgrade()) {
            let mut state = shared.lock();
            state.release();
            drop(state);
        }
    }
}

/// A live instance and its slot: what a call works with. Dropping it drops the
/// instance first, then frees the slot.
pub struct Lease<T> {
    // Field order is drop order: the instance goes before its slot is handed on.
    value: T,
    slot: Slot<T>,
}

impl<T> Lease<T> {
    pub fn new(slot: Slot<T>, value: T) -> Self {
        Lease { value, slot }
    }
}

impl<T> Deref for Lease<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> DerefMut for Lease<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

struct Idle<T> {
    lease: Lease<T>,
    since: Instant,
    seq: u64,
}

struct State<T> {
    /// Slots held: leases in calls, idle leases, and slots not yet made instances.
    live: usize,
    peak: usize,
    idle: HashMap<SeatId, Idle<T>>,
    /// Idle seats, least recently used first (by check-in sequence number).
    lru: BTreeMap<u64, SeatId>,
    next_seq: u64,
    /// Calls waiting for a slot, first come first served.
    waiters: VecDeque<(u64, oneshot::Sender<()>)>,
    next_waiter: u64,
    sweeper: Option<JoinHandle<()>>,
    acquired: u64,
    reclaimed: u64,
    expired: u64,
    waits: u64,
    wait_timeouts: u64,
}

impl<T> State<T> {
    /// A slot was given up: hand it to the first waiter still waiting, or free it.
    fn release(&mut self) {
        while let Some((_, tx)) = self.waiters.pop_front() {
            if tx.send(()).is_ok() {
                self.acquired += 1;
                return;
            }
        }
        self.live = self.live.saturating_sub(1);
    }

    fn take_live(&mut self) {
        self.live += 1;
        self.peak = self.peak.max(self.live);
        self.acquired += 1;
    }

    fn remove_idle(&mut self, seat: SeatId) -> Option<Lease<T>> {
        let idle = self.idle.remove(&seat)?;
        self.lru.remove(&idle.seq);
        Some(idle.lease)
    }

    fn pop_lru(&mut self) -> Option<Lease<T>> {
        let (_, seat) = self.lru.pop_first()?;
        self.idle.remove(&seat).map(|i| i.lease)
    }

    fn has_waiters(&self) -> bool {
        self.waiters.iter().any(|(_, tx)| !tx.is_closed())
    }
}

struct Shared<T> {
    capacity: usize,
    idle_timeout: Duration,
    state: Mutex<State<T>>,
    /// Wakes the sweeper when an instance goes idle in an empty pool.
    wake_sweeper: Arc<Notify>,
    on_demand: AtomicU64,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<T> Drop for Shared<T> {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(sweeper) = state.sweeper.take() {
            sweeper.abort();
        }
    }
}

static NEXT_SEAT: AtomicU64 = AtomicU64::new(1);

/// The bounded pool of live instances. Cheap to clone (one shared pool).
pub struct InstancePool<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for InstancePool<T> {
    fn clone(&self) -> Self {
        InstancePool {
            shared: self.shared.clone(),
        }
    }
}

impl<T> std::fmt::Debug for InstancePool<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstancePool")
            .field("capacity", &self.shared.capacity)
            .field("idle_timeout", &self.shared.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> InstancePool<T> {
    /// A pool of at most `capacity` live instances (at least 1) whose idle
    /// instances are dropped after `idle_timeout` (zero: as soon as a call ends).
    pub fn new(capacity: usize, idle_timeout: Duration) -> Self {
        InstancePool {
            shared: Arc::new(Shared {
                capacity: capacity.max(1),
                idle_timeout,
                state: Mutex::new(State {
                    live: 0,
                    peak: 0,
                    idle: HashMap::new(),
                    lru: BTreeMap::new(),
                    next_seq: 0,
                    waiters: VecDeque::new(),
                    next_waiter: 0,
                    sweeper: None,
                    acquired: 0,
                    reclaimed: 0,
                    expired: 0,
                    waits: 0,
                    wait_timeouts: 0,
                }),
                wake_sweeper: Arc::new(Notify::new()),
                on_demand: AtomicU64::new(0),
            }),
        }
    }

    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }

    pub fn idle_timeout(&self) -> Duration {
        self.shared.idle_timeout
    }

    /// A new seat (unique in the process).
    pub fn seat(&self) -> SeatId {
        NEXT_SEAT.fetch_add(1, Ordering::Relaxed)
    }

    /// The seat's warm instance, if the pool still holds it; from now on it is in a
    /// call and cannot be reclaimed until [`put_idle`](Self::put_idle).
    pub fn take_idle(&self, seat: SeatId) -> Option<Lease<T>> {
        self.shared.lock().remove_idle(seat)
    }

    /// Whether the pool holds an idle instance of `seat`.
    pub fn is_idle(&self, seat: SeatId) -> bool {
        self.shared.lock().idle.contains_key(&seat)
    }

    /// A slot for a new instance: a free one, or the least recently used idle
    /// instance's (that instance is dropped), or, when every slot is in a call, the
    /// next one freed, waiting at most `wait`.
    pub async fn acquire(&self, wait: Duration) -> Result<Slot<T>, PoolTimeout> {
        let started = Instant::now();
        self.sweep();
        let shared = &self.shared;
        let (id, rx) = {
            let mut state = shared.lock();
            if state.live < shared.capacity {
                state.take_live();
                return Ok(self.slot());
            }
            if let Some(victim) = state.pop_lru() {
                state.reclaimed += 1;
                state.acquired += 1;
                drop(state);
                // The victim's slot moves to the caller; its instance is dropped
                // before the caller creates another.
                let Lease { value, slot } = victim;
                drop(value);
                return Ok(slot);
            }
            state.waits += 1;
            let id = state.next_waiter;
            state.next_waiter += 1;
            let (tx, rx) = oneshot::channel();
            state.waiters.push_back((id, tx));
            (id, rx)
        };
        let mut waiting = Waiting {
            shared: shared.clone(),
            id,
            rx,
            done: false,
        };
        match tokio::time::timeout_at(started + wait, &mut waiting.rx).await {
            Ok(Ok(())) => {
                waiting.done = true;
                Ok(self.slot())
            }
            // The pool went away under us (only when it is being dropped).
            Ok(Err(_)) => {
                waiting.done = true;
                Err(PoolTimeout {
                    capacity: shared.capacity,
                    waited: started.elapsed(),
                })
            }
            Err(_elapsed) => {
                let mut state = shared.lock();
                waiting.done = true;
                if waiting.rx.try_recv().is_ok() {
                    // Granted just as the wait ran out: take it.
                    return Ok(self.slot());
                }
                state.waiters.retain(|(w, _)| *w != id);
                state.wait_timeouts += 1;
                Err(PoolTimeout {
                    capacity: shared.capacity,
                    waited: wait,
                })
            }
        }
    }

    /// Gives a seat's instance back after a call: it stays warm, reclaimable, until
    /// the seat's next call takes it, another seat needs its slot, or it expires. If
    /// a call is waiting for a slot, the instance is dropped at once and the waiter
    /// gets its slot.
    pub fn put_idle(&self, seat: SeatId, lease: Lease<T>) {
        let shared = &self.shared;
        if shared.idle_timeout.is_zero() {
            drop(lease);
            return;
        }
        let mut state = shared.lock();
        if state.has_waiters() {
            state.reclaimed += 1;
            drop(state);
            drop(lease);
            return;
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        let was_empty = state.idle.is_empty();
        let old = state.remove_idle(seat);
        state.lru.insert(seq, seat);
        state.idle.insert(
            seat,
            Idle {
                lease,
                since: Instant::now(),
                seq,
            },
        );
        let start_sweeper = state.sweeper.as_ref().is_none_or(|h| h.is_finished());
        if start_sweeper && let Ok(rt) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(shared);
            let wake = shared.wake_sweeper.clone();
            state.sweeper = Some(rt.spawn(sweeper(weak, wake)));
        }
        drop(state);
        if was_empty || start_sweeper {
            shared.wake_sweeper.notify_one();
        }
        drop(old);
    }

    /// Drops the seat's idle instance, if the pool holds one (the sandbox is gone,
    /// or its persona was replaced).
    pub fn discard(&self, seat: SeatId) {
        let lease = self.shared.lock().remove_idle(seat);
        drop(lease);
    }

    /// Drops every instance idle for `instance_idle` or longer; returns when the next
    /// one will be due.
    pub fn sweep(&self) -> Option<Instant> {
        sweep_shared(&self.shared)
    }

    /// Counts an instance that on-demand allocation created because the pooling
    /// allocator refused it.
    pub fn note_on_demand(&self) {
        self.shared.on_demand.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> PoolStats {
        let state = self.shared.lock();
        let idle = state.idle.len();
        PoolStats {
            capacity: self.shared.capacity,
            live: state.live,
            in_use: state.live.saturating_sub(idle),
            idle,
            waiting: state
                .waiters
                .iter()
                .filter(|(_, tx)| !tx.is_closed())
                .count(),
            peak_live: state.peak,
            acquired: state.acquired,
            reclaimed: state.reclaimed,
            expired: state.expired,
            waits: state.waits,
            wait_timeouts: state.wait_timeouts,
            on_demand: self.shared.on_demand.load(Ordering::Relaxed),
        }
    }

    fn slot(&self) -> Slot<T> {
        Slot {
            pool: Some(Arc::downgrade(&self.shared)),
        }
    }
}

fn sweep_shared<T>(shared: &Shared<T>) -> Option<Instant> {
    let timeout = shared.idle_timeout;
    let now = Instant::now();
    let mut due = Vec::new();
    let mut state = shared.lock();
    let next = loop {
        let Some((_, seat)) = state.lru.first_key_value() else {
            break None;
        };
        let seat = *seat;
        let since = state.idle.get(&seat).map_or(now, |i| i.since);
        if since + timeout > now {
            break Some(since + timeout);
        }
        if let Some(lease) = state.remove_idle(seat) {
            state.expired += 1;
            due.push(lease);
        }
    };
    drop(state);
    // Each drop frees its instance, then its slot (taking the lock again).
    drop(due);
    next
}

/// Drops idle instances when they expire; ends when the pool is dropped.
async fn sweeper<T>(pool: Weak<Shared<T>>, wake: Arc<Notify>) {
    loop {
        let next = match pool.upgrade() {
            Some(shared) => sweep_shared(&shared),
            None => return,
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

/// A registered waiter; if the wait is abandoned (the call was cancelled), a slot
/// granted meanwhile is passed on instead of being lost.
struct Waiting<T> {
    shared: Arc<Shared<T>>,
    id: u64,
    rx: oneshot::Receiver<()>,
    done: bool,
}

impl<T> Drop for Waiting<T> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut state = self.shared.lock();
        if self.rx.try_recv().is_ok() {
            state.release();
        } else {
            let id = self.id;
            state.waiters.retain(|(w, _)| *w != id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// Counts live values, to check that the pool never holds more than it may.
    #[derive(Debug)]
    struct Counted(Arc<AtomicUsize>);

    impl Counted {
        fn new(n: &Arc<AtomicUsize>) -> Self {
            n.fetch_add(1, Ordering::SeqCst);
            Counted(n.clone())
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    const WAIT: Duration = Duration::from_secs(60);

    async fn call(pool: &InstancePool<Counted>, seat: SeatId, alive: &Arc<AtomicUsize>) {
        let lease = match pool.take_idle(seat) {
            Some(l) => l,
            None => Lease::new(pool.acquire(WAIT).await.expect("slot"), Counted::new(alive)),
        };
        assert!(alive.load(Ordering::SeqCst) <= pool.capacity());
        tokio::task::yield_now().await;
        pool.put_idle(seat, lease);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_pool_reclaims_the_least_recently_used() {
        let pool = InstancePool::new(2, Duration::from_secs(60));
        let alive = Arc::new(AtomicUsize::new(0));
        let seats: Vec<SeatId> = (0..3).map(|_| pool.seat()).collect();
        call(&pool, seats[0], &alive).await;
        call(&pool, seats[1], &alive).await;
        assert_eq!(pool.stats().idle, 2);
        call(&pool, seats[0], &alive).await; // warm: seat 1 is now the LRU
        assert_eq!(pool.stats().reclaimed, 0);
        call(&pool, seats[2], &alive).await;
        let s = pool.stats();
        assert_eq!((s.reclaimed, s.live, s.idle), (1, 2, 2));
        assert!(pool.take_idle(seats[1]).is_none(), "seat 1 was the LRU");
        assert!(pool.is_idle(seats[0]) && pool.is_idle(seats[2]));
        assert_eq!(alive.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_in_a_call_is_never_reclaimed() {
        let pool = InstancePool::new(1, Duration::from_secs(60));
        let alive = Arc::new(AtomicUsize::new(0));
        let a = pool.seat();
        let lease = Lease::new(pool.acquire(WAIT).await.unwrap(), Counted::new(&alive));
        // Nobody can have a's slot while a's call runs: a caller waits, then gives up.
        let err = pool.acquire(Duration::from_secs(5)).await.unwrap_err();
        assert_eq!(err.capacity, 1);
        assert!(err.to_string().contains("all 1 instances"), "{err}");
        assert_eq!(alive.load(Ordering::SeqCst), 1, "a's instance is intact");
        let s = pool.stats();
        assert_eq!((s.waits, s.wait_timeouts, s.reclaimed), (1, 1, 0));
        // Once a's call ends, a waiter gets the slot (a's instance is dropped for it).
        let waiter = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(WAIT).await.map(|_slot| ()) })
        };
        tokio::task::yield_now().await;
        assert_eq!(pool.stats().waiting, 1);
        pool.put_idle(a, lease);
        waiter.await.unwrap().expect("slot handed over");
        assert_eq!(alive.load(Ordering::SeqCst), 0);
        assert_eq!(pool.stats().reclaimed, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_order_and_nothing_leaks() {
        let pool = InstancePool::new(2, Duration::from_secs(60));
        let alive = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let pool = pool.clone();
            let alive = alive.clone();
            let seat = pool.seat();
            tasks.push(tokio::spawn(async move {
                for _ in 0..20 {
                    call(&pool, seat, &alive).await;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let s = pool.stats();
        assert!(s.peak_live <= 2, "{s:?}");
        assert!(s.reclaimed > 0 && s.waits > 0, "{s:?}");
        assert_eq!(s.wait_timeouts, 0);
        assert_eq!(s.live, s.idle);
        assert_eq!(alive.load(Ordering::SeqCst), s.live);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_wait_passes_its_slot_on() {
        let pool = InstancePool::<Counted>::new(1, Duration::from_secs(60));
        let held = pool.acquire(WAIT).await.unwrap();
        let cancelled = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(WAIT).await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        let next = {
            let pool = pool.clone();
            tokio::spawn(async move { pool.acquire(WAIT).await.map(drop) })
        };
        tokio::task::yield_now().await;
        assert_eq!(pool.stats().waiting, 2);
        // The slot goes to the first waiter, which is cancelled before it runs:
        // the slot must move on to the next one.
        drop(held);
        cancelled.abort();
        let _ = cancelled.await;
        next.await
            .unwrap()
            .expect("the slot went to the next waiter");
        let s = pool.stats();
        assert_eq!((s.live, s.waiting), (0, 0), "{s:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_instances_expire() {
        let pool = InstancePool::new(4, Duration::from_secs(60));
        let alive = Arc::new(AtomicUsize::new(0));
        let (a, b) = (pool.seat(), pool.seat());
        call(&pool, a, &alive).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        call(&pool, b, &alive).await;
        tokio::time::sleep(Duration::from_secs(31)).await;
        // a has been idle 61 s, b 31 s.
        let s = pool.stats();
        assert_eq!((s.expired, s.live, s.idle), (1, 1, 1), "{s:?}");
        assert!(pool.take_idle(a).is_none());
        tokio::time::sleep(Duration::from_secs(30)).await;
        let s = pool.stats();
        assert_eq!((s.expired, s.live), (2, 0), "{s:?}");
        assert_eq!(alive.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn discarding_a_seat_frees_its_slot() {
        let pool = InstancePool::new(1, Duration::from_secs(60));
        let alive = Arc::new(AtomicUsize::new(0));
        let a = pool.seat();
        call(&pool, a, &alive).await;
        pool.discard(a);
        let s = pool.stats();
        assert_eq!((s.live, s.reclaimed), (0, 0));
        assert_eq!(alive.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_zero_idle_time_keeps_nothing_warm() {
        let pool = InstancePool::new(1, Duration::ZERO);
        let alive = Arc::new(AtomicUsize::new(0));
        let a = pool.seat();
        call(&pool, a, &alive).await;
        assert_eq!(pool.stats().live, 0);
        assert_eq!(alive.load(Ordering::SeqCst), 0);
    }
}
