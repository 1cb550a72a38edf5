//! Admission, in two steps. A new generation is admitted whole ([`Admission::admit`]): it
//! reserves a place among the generations the workers' slots and the queue can hold, and
//! one among its API key's (`--max-streams-per-key`), both in one step under one lock, so
//! a burst is never admitted past the bounds. Then each of its blocks waits for a slot (one
//! per block a worker takes at once: their `Info.capacity`, summed over the healthy
//! workers) in its key's queue ([`Admission::acquire`]). Freed slots go to the keys with
//! waiting blocks in turn, so one key's burst cannot starve another key's first block;
//! within a key, higher `priority` first, then arrival. A key marked `priority` in the
//! keys file may jump the turn: its blocks of positive priority wait in one band served
//! before every key's turn, highest first. A generation's first block may
//! wait only until its deadline (the call's gRPC deadline, `--max-queue-wait-secs`);
//! once it has streamed, a generation waits for its slots however long the queue: it is
//! never failed by load.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::Error;

/// The workers' slots, the generations admitted and the blocks queued for slots.
pub struct Admission {
    state: Mutex<State>,
    /// Blocks that may wait beyond the slots (`--max-queue`).
    max_waiting: usize,
    /// Generations one API key may have admitted at once (0: no limit).
    max_per_key: usize,
}

#[derive(Default)]
struct State {
    /// Slots in existence.
    total: usize,
    /// Slots to retire as they come back (capacity that went away while in use).
    debt: usize,
    /// Slots nobody holds.
    free: usize,
    /// Generations admitted and not ended, in all and by key.
    admitted: usize,
    per_key: HashMap<String, usize>,
    /// Blocks waiting, by key, each queue highest priority first, then oldest.
    queues: HashMap<String, Vec<Waiter>>,
    /// The keys with waiting blocks, in the order they are served.
    turn: VecDeque<String>,
    /// Blocks of positive priority of keys allowed it across keys, served before the
    /// turn: highest priority first, then oldest.
    urgent: Vec<Waiter>,
    waiting: usize,
    next_seq: u64,
}

/// A block waiting for a slot.
struct Waiter {
    priority: i32,
    seq: u64,
    grant: oneshot::Sender<Slot>,
}

/// One [`Admission`] per model the workers serve: a model's blocks wait for the slots
/// of the workers serving it, and `--max-queue` and `--max-streams-per-key` hold per
/// model.
pub struct Admissions {
    max_waiting: usize,
    max_per_key: usize,
    by_model: Mutex<HashMap<String, Arc<Admission>>>,
}

impl Admissions {
    /// None yet; each model's is made with the bounds of [`Admission::new`].
    pub fn new(max_waiting: usize, max_per_key: usize) -> Self {
        Self {
            max_waiting,
            max_per_key,
            by_model: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Admission>>> {
        self.by_model.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The admission of `model` (without slots until its workers' capacity is set).
    pub fn of(&self, model: &str) -> Arc<Admission> {
        let mut by_model = self.lock();
        let admission = by_model
            .entry(model.to_string())
            .or_insert_with(|| Arc::new(Admission::new(self.max_waiting, self.max_per_key)));
        admission.clone()
    }

    /// Sets each model's slots to its healthy workers' capacity (0 for a model none
    /// serves any more).
    pub fn set_capacities(&self, by_model: &std::collections::BTreeMap<String, usize>) {
        for model in by_model.keys() {
            self.of(model);
        }
        let admissions: Vec<_> = self
            .lock()
            .iter()
            .map(|(m, a)| (m.clone(), a.clone()))
            .collect();
        for (model, admission) in admissions {
            admission.set_capacity(by_model.get(&model).copied().unwrap_or(0));
        }
        crate::metrics::slots(by_model.values().sum());
    }

    /// Blocks waiting for a slot, all models together.
    pub fn waiting(&self) -> usize {
        self.lock().values().map(|a| a.waiting()).sum()
    }
}

/// Where and how long a block waits.
#[derive(Debug, Clone)]
pub struct Queueing {
    /// The model whose workers' slots it waits for.
    pub model: String,
    /// Its API key's id (empty on an open API: one queue).
    pub key: String,
    /// Higher first within the key's turn.
    pub priority: i32,
    /// The key may use priority across keys: a positive one goes before every key's
    /// turn.
    pub across: bool,
    /// Until when it may wait, and what it is when it passes; `None` after the first
    /// block.
    pub deadline: Option<(Instant, Expiry)>,
}

/// What a deadline that passed in the queue is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// The call's gRPC deadline: DEADLINE_EXCEEDED.
    Call,
    /// `--max-queue-wait-secs`: RESOURCE_EXHAUSTED.
    QueueWait,
}

/// A generation's place among the admitted, given back when dropped.
pub struct Ticket {
    admission: Arc<Admission>,
    key: Option<String>,
}

/// The right to send one block to a worker, returned when dropped.
pub struct Slot {
    admission: Arc<Admission>,
    /// False for a slot that was never handed out (its waiter had gone): nothing to return.
    armed: bool,
}

impl Admission {
    /// No slots yet (see [`Admission::set_capacity`]); at most `max_waiting` blocks queue
    /// beyond the slots; an API key has at most `max_per_key` generations (0: no limit).
    pub fn new(max_waiting: usize, max_per_key: usize) -> Self {
        Self {
            state: Mutex::default(),
            max_waiting,
            max_per_key,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the number of slots: the capacity of the healthy workers.
    pub fn set_capacity(self: &Arc<Self>, total: usize) {
        let mut s = self.lock();
        if total > s.total {
            let added = total - s.total;
            let repaid = added.min(s.debt);
            s.debt -= repaid;
            for _ in repaid..added {
                self.hand_out(&mut s);
            }
        } else {
            let cut = s.total - total;
            let taken = cut.min(s.free);
            s.free -= taken;
            s.debt += cut - taken;
        }
        s.total = total;
    }

    /// Slots the workers offer now (some may still be retiring).
    pub fn capacity(&self) -> usize {
        self.lock().total
    }

    /// Blocks waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.lock().waiting
    }

    /// Admits a new generation of `key` (`None` on an open API), or refuses it with
    /// RESOURCE_EXHAUSTED: when the slots and the queue hold as many generations as they
    /// can (with a bound of 0, only a free slot admits), or the key has its limit.
    pub fn admit(self: &Arc<Self>, key: Option<&str>) -> Result<Ticket, Error> {
        let mut s = self.lock();
        if s.admitted >= s.total.saturating_add(self.max_waiting) {
            let admitted = s.admitted;
            tracing::warn!(admitted, "request refused: the queue is full");
            bd3lm_telemetry::metrics::refused("queue");
            return Err(Error::Refused(format!(
                "the server is at capacity: {admitted} generations are running or queued \
                 (limit {} beyond the workers' slots)",
                self.max_waiting
            )));
        }
        if let Some(key) = key {
            let running = s.per_key.get(key).copied().unwrap_or(0);
            if self.max_per_key > 0 && running >= self.max_per_key {
                tracing::info!(
                    running,
                    "request refused: the API key's generations are at their limit"
                );
                bd3lm_telemetry::metrics::refused("streams_per_key");
                return Err(Error::Refused(format!(
                    "this API key has {running} generations running, its limit; retry when \
                     one ends"
                )));
            }
            *s.per_key.entry(key.to_string()).or_default() += 1;
        }
        s.admitted += 1;
        Ok(Ticket {
            admission: self.clone(),
            key: key.map(str::to_string),
        })
    }

    /// Waits for a slot in `queueing`'s key's queue. Fails when its deadline passes
    /// first, and with UNAVAILABLE when no worker has had any capacity for `idle` (none
    /// healthy), never because the others are busy.
    pub async fn acquire(
        self: &Arc<Self>,
        queueing: &Queueing,
        idle: Duration,
    ) -> Result<Slot, Error> {
        let (mut granted, mut place) = {
            let mut s = self.lock();
            if s.free > 0 && s.waiting == 0 {
                s.free -= 1;
                return Ok(self.slot());
            }
            let (tx, rx) = oneshot::channel();
            let seq = s.enqueue(queueing, tx);
            (
                rx,
                Place {
                    admission: self,
                    key: &queueing.key,
                    seq: Some(seq),
                },
            )
        };
        let deadline = queueing.deadline;
        loop {
            let until = deadline.map_or(Instant::now() + idle, |(at, _)| {
                at.min(Instant::now() + idle)
            });
            tokio::select! {
                slot = &mut granted => {
                    place.seq = None;
                    return slot.map_err(|_| Error::Internal("the admission queue closed"));
                }
                () = tokio::time::sleep_until(until.into()) => {
                    let expired = deadline.filter(|(at, _)| Instant::now() >= *at);
                    let failure = match expired {
                        Some((_, expiry)) => expiry.error(),
                        None if self.capacity() == 0 => Error::NoWorker,
                        None => continue,
                    };
                    // Granted meanwhile: the slot is in the channel; take it after all.
                    if !place.leave() {
                        return granted.await.map_err(|_| Error::Internal("the admission queue closed"));
                    }
                    return Err(failure);
                }
            }
        }
    }

    fn slot(self: &Arc<Self>) -> Slot {
        Slot {
            admission: self.clone(),
            armed: true,
        }
    }

    /// A slot came free: to the next waiting block, else kept free.
    fn hand_out(self: &Arc<Self>, s: &mut State) {
        while let Some(waiter) = s.next_waiter() {
            s.waiting -= 1;
            crate::metrics::queue(-1.0);
            match waiter.grant.send(self.slot()) {
                Ok(()) => return,
                // Its block stopped waiting: the slot was never handed out.
                Err(mut slot) => slot.armed = false,
            }
        }
        s.free += 1;
    }
}

impl State {
    /// Takes the next waiter: the urgent band's first, else the first of the next key in
    /// turn (which goes to the back of the turn while it has more).
    fn next_waiter(&mut self) -> Option<Waiter> {
        if !self.urgent.is_empty() {
            return Some(self.urgent.remove(0));
        }
        while let Some(key) = self.turn.pop_front() {
            let Some(queue) = self.queues.get_mut(&key) else {
                continue;
            };
            let waiter = queue.remove(0);
            if queue.is_empty() {
                self.queues.remove(&key);
            } else {
                self.turn.push_back(key);
            }
            return Some(waiter);
        }
        None
    }

    /// Queues a waiter of `queueing` behind those of higher or equal priority: in the
    /// urgent band when its key may use priority across keys and it has a positive one,
    /// else in its key's queue. Its sequence number.
    fn enqueue(&mut self, queueing: &Queueing, grant: oneshot::Sender<Slot>) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let priority = queueing.priority;
        let queue = if queueing.across && priority > 0 {
            &mut self.urgent
        } else {
            let queue = self.queues.entry(queueing.key.clone()).or_default();
            if queue.is_empty() {
                self.turn.push_back(queueing.key.clone());
            }
            queue
        };
        let at = queue.partition_point(|w| w.priority >= priority);
        queue.insert(
            at,
            Waiter {
                priority,
                seq,
                grant,
            },
        );
        self.waiting += 1;
        crate::metrics::queue(1.0);
        seq
    }

    /// Takes waiter `seq` of `key` out of the queue; false when it was no longer there.
    fn leave(&mut self, key: &str, seq: u64) -> bool {
        if let Some(at) = self.urgent.iter().position(|w| w.seq == seq) {
            self.urgent.remove(at);
            self.waiting -= 1;
            crate::metrics::queue(-1.0);
            return true;
        }
        let Some(queue) = self.queues.get_mut(key) else {
            return false;
        };
        let Some(at) = queue.iter().position(|w| w.seq == seq) else {
            return false;
        };
        queue.remove(at);
        if queue.is_empty() {
            self.queues.remove(key);
            self.turn.retain(|k| k != key);
        }
        self.waiting -= 1;
        crate::metrics::queue(-1.0);
        true
    }
}

impl Expiry {
    fn error(self) -> Error {
        match self {
            Expiry::Call => {
                bd3lm_telemetry::metrics::refused("deadline");
                Error::DeadlineExceeded
            }
            Expiry::QueueWait => {
                bd3lm_telemetry::metrics::refused("queue_wait");
                Error::QueueWait
            }
        }
    }
}

/// A block's place in its queue, left when the wait ends early (a deadline, or the
/// caller gone: the future dropped).
struct Place<'a> {
    admission: &'a Arc<Admission>,
    key: &'a str,
    /// `None` once granted or left.
    seq: Option<u64>,
}

impl Place<'_> {
    /// Leaves the queue; false when a slot was granted first.
    fn leave(&mut self) -> bool {
        match self.seq.take() {
            Some(seq) => self.admission.lock().leave(self.key, seq),
            None => false,
        }
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut s = self.admission.lock();
        if s.debt > 0 {
            s.debt -= 1;
        } else {
            self.admission.hand_out(&mut s);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut s = self.admission.lock();
        s.admitted -= 1;
        if let Some(key) = &self.key
            && let Some(count) = s.per_key.get_mut(key)
        {
            *count -= 1;
            if *count == 0 {
                s.per_key.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(30);

    fn queueing(key: &str, priority: i32) -> Queueing {
        Queueing {
            model: "m".into(),
            key: key.into(),
            priority,
            across: false,
            deadline: None,
        }
    }

    /// Spawns a waiter for a slot that records `tag` in `order` once granted.
    fn waiter(
        admission: &Arc<Admission>,
        q: Queueing,
        tag: &'static str,
        order: &Arc<Mutex<Vec<&'static str>>>,
    ) -> tokio::task::JoinHandle<()> {
        let (admission, order) = (admission.clone(), order.clone());
        tokio::spawn(async move {
            let slot = admission.acquire(&q, IDLE).await.unwrap();
            order.lock().unwrap().push(tag);
            drop(slot);
        })
    }

    async fn until_waiting(admission: &Admission, n: usize) {
        while admission.waiting() < n {
            tokio::task::yield_now().await;
        }
    }

    /// Slots go to the keys in turn (one key's burst does not starve another's block),
    /// within a key to the higher priority first, then in arrival order; capacity that
    /// shrinks while its slots are in use is retired as they come back.
    #[tokio::test]
    async fn slots_go_to_keys_in_turn_and_follow_the_capacity() {
        let admission = Arc::new(Admission::new(16, 0));
        admission.set_capacity(2);
        let a = admission
            .acquire(&queueing("burst", 0), IDLE)
            .await
            .unwrap();
        let b = admission
            .acquire(&queueing("burst", 0), IDLE)
            .await
            .unwrap();
        admission.set_capacity(1);
        assert_eq!(admission.capacity(), 1);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        let queued = [
            ("burst", 0, "burst-1"),
            ("burst", 0, "burst-2"),
            ("burst", 5, "burst-urgent"),
            ("small", 0, "small"),
        ];
        for (i, (key, priority, tag)) in queued.into_iter().enumerate() {
            waiters.push(waiter(&admission, queueing(key, priority), tag, &order));
            until_waiting(&admission, i + 1).await;
        }
        drop(a); // retired: the capacity is 1 now
        tokio::task::yield_now().await;
        assert!(order.lock().unwrap().is_empty());
        drop(b);
        for w in waiters {
            w.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order, ["burst-urgent", "small", "burst-1", "burst-2"]);
        assert_eq!(admission.lock().free, 1);
    }

    /// A key allowed priority across keys goes before every key's turn with a positive
    /// priority (highest first), and takes its turn like any key without one; another
    /// key's priority stays within its own queue. A waiter of the band that leaves gives
    /// its place up.
    #[tokio::test]
    async fn priority_across_keys_goes_before_the_turn() {
        let admission = Arc::new(Admission::new(16, 0));
        admission.set_capacity(1);
        let held = admission.acquire(&queueing("a", 0), IDLE).await.unwrap();
        let across = |key: &str, priority| Queueing {
            across: true,
            ..queueing(key, priority)
        };
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        let queued = [
            (queueing("a", 0), "a"),
            (queueing("b", 9), "b-high"),
            (across("vip", 0), "vip-plain"),
            (across("vip", 2), "vip-2"),
            (across("ops", 7), "ops-7"),
        ];
        for (i, (q, tag)) in queued.into_iter().enumerate() {
            waiters.push(waiter(&admission, q, tag, &order));
            until_waiting(&admission, i + 1).await;
        }
        let gone = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.acquire(&across("ops", 99), IDLE).await })
        };
        until_waiting(&admission, 6).await;
        gone.abort();
        let _ = gone.await;
        assert_eq!(admission.waiting(), 5, "the band's waiter left");
        drop(held);
        for w in waiters {
            w.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order, ["ops-7", "vip-2", "a", "b-high", "vip-plain"]);
    }

    /// Admission reserves: a burst is admitted up to the slots and the queue, never past
    /// them, whatever has started waiting; a key is held to its own limit; places come
    /// back as tickets drop.
    #[tokio::test]
    async fn admission_reserves_places_in_all_and_per_key() {
        let admission = Arc::new(Admission::new(2, 3));
        assert!(admission.admit(Some("k")).is_ok(), "the queue holds it");
        admission.set_capacity(2);
        let held: Vec<Ticket> = (0..3)
            .map(|_| admission.admit(Some("k")).unwrap())
            .collect();
        let per_key = admission.admit(Some("k")).err().unwrap().into_status();
        assert_eq!(per_key.code(), tonic::Code::ResourceExhausted);
        assert!(per_key.message().contains("API key"), "{per_key}");
        let other: Vec<Ticket> = (0..1)
            .map(|_| admission.admit(Some("j")).unwrap())
            .collect();
        let full = admission.admit(None).err().unwrap().into_status();
        assert!(full.message().contains("at capacity"), "{full}");
        drop(other);
        assert!(admission.admit(None).is_ok());
        drop(held);
        assert!(admission.admit(Some("k")).is_ok());
    }

    #[tokio::test]
    async fn without_a_queue_only_a_free_slot_admits() {
        let admission = Arc::new(Admission::new(0, 0));
        assert!(admission.admit(None).is_err(), "no capacity yet");
        admission.set_capacity(1);
        let ticket = admission.admit(None).unwrap();
        assert!(admission.admit(None).is_err());
        drop(ticket);
        assert!(admission.admit(None).is_ok());
    }

    /// A first block that waits past its deadline fails with the deadline's code and
    /// leaves the queue; with no capacity at all a wait is UNAVAILABLE.
    #[tokio::test]
    async fn deadlines_end_the_wait_and_no_capacity_is_unavailable() {
        let admission = Arc::new(Admission::new(4, 0));
        admission.set_capacity(1);
        let _held = admission.acquire(&queueing("k", 0), IDLE).await.unwrap();
        for (expiry, code) in [
            (Expiry::Call, tonic::Code::DeadlineExceeded),
            (Expiry::QueueWait, tonic::Code::ResourceExhausted),
        ] {
            let q = Queueing {
                deadline: Some((Instant::now() + Duration::from_millis(30), expiry)),
                ..queueing("k", 0)
            };
            let failed = admission
                .acquire(&q, IDLE)
                .await
                .err()
                .unwrap()
                .into_status();
            assert_eq!(failed.code(), code, "{failed}");
            assert_eq!(admission.waiting(), 0, "it left the queue");
        }
        let none = Arc::new(Admission::new(1, 0));
        let outcome = none
            .acquire(&queueing("k", 0), Duration::from_millis(20))
            .await;
        let outcome = outcome.err().unwrap().into_status();
        assert_eq!(outcome.code(), tonic::Code::Unavailable);
        assert_eq!(none.waiting(), 0);
    }

    /// A waiter whose future is dropped (its client went away) leaves the queue, and the
    /// slot it would have had goes to the next.
    #[tokio::test]
    async fn a_dropped_waiter_leaves_the_queue() {
        let admission = Arc::new(Admission::new(4, 0));
        admission.set_capacity(1);
        let held = admission.acquire(&queueing("k", 0), IDLE).await.unwrap();
        let gone = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.acquire(&queueing("k", 0), IDLE).await })
        };
        until_waiting(&admission, 1).await;
        gone.abort();
        let _ = gone.await;
        assert_eq!(admission.waiting(), 0);
        drop(held);
        let q = queueing("j", 0);
        let next = tokio::time::timeout(Duration::from_secs(5), admission.acquire(&q, IDLE));
        assert!(next.await.unwrap().is_ok());
    }
}
