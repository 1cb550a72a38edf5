//! Admission of blocks to the workers' capacity: one slot per block a worker can take at
//! once (their `Info.capacity`, summed over the healthy workers), handed out first come,
//! first served. New requests are refused while the queue is at its bound; a generation
//! already admitted waits for its slots, however long the queue: it is never failed by
//! load.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::Error;

/// The slots and the queue in front of them.
pub struct Admission {
    /// Free slots; tokio's semaphore serves waiters in arrival order.
    slots: Arc<Semaphore>,
    capacity: Mutex<Capacity>,
    /// Blocks waiting for a slot.
    waiting: AtomicUsize,
    max_waiting: usize,
}

/// Slots in existence, and those to retire as they come back (capacity that went away
/// while its slots were in use).
#[derive(Default)]
struct Capacity {
    total: usize,
    debt: usize,
}

/// The right to send one block to a worker, returned when dropped.
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    admission: Arc<Admission>,
}

impl Admission {
    /// No slots yet (see [`Admission::set_capacity`]); at most `max_waiting` blocks queue.
    pub fn new(max_waiting: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(0)),
            capacity: Mutex::default(),
            waiting: AtomicUsize::new(0),
            max_waiting,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Capacity> {
        self.capacity.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the number of slots: the capacity of the healthy workers.
    pub fn set_capacity(&self, total: usize) {
        let mut c = self.lock();
        if total > c.total {
            let repaid = (total - c.total).min(c.debt);
            c.debt -= repaid;
            self.slots.add_permits(total - c.total - repaid);
        } else if total < c.total {
            let cut = c.total - total;
            let forgotten = self.slots.forget_permits(cut);
            c.debt += cut - forgotten;
        }
        c.total = total;
        crate::metrics::slots(total);
    }

    /// Slots the workers offer now (some may still be retiring).
    pub fn capacity(&self) -> usize {
        self.lock().total
    }

    /// Blocks waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Admits a new request, or refuses it with RESOURCE_EXHAUSTED while the queue is full
    /// and no slot is free (with a bound of 0, only a free slot admits).
    pub fn admit(&self) -> Result<(), Error> {
        let waiting = self.waiting();
        if waiting >= self.max_waiting && self.slots.available_permits() == 0 {
            tracing::warn!(waiting, "request refused: the queue is full");
            bd3lm_telemetry::metrics::refused("queue");
            return Err(Error::Refused(format!(
                "the server is at capacity: {waiting} blocks are queued (limit {})",
                self.max_waiting
            )));
        }
        Ok(())
    }

    /// Waits for a slot in arrival order. Fails with UNAVAILABLE only when no worker has
    /// had any capacity for `idle` (none healthy), never because the others are busy.
    pub async fn acquire(self: &Arc<Self>, idle: Duration) -> Result<Slot, Error> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        crate::metrics::queue(1.0);
        let _queued = Decrement(&self.waiting);
        // One acquisition kept across the checks, so the place in the queue is kept too.
        let acquire = self.slots.clone().acquire_owned();
        tokio::pin!(acquire);
        loop {
            tokio::select! {
                permit = &mut acquire => {
                    let permit = permit.expect("the slots are never closed");
                    return Ok(Slot { permit: Some(permit), admission: self.clone() });
                }
                () = tokio::time::sleep(idle) => {
                    if self.capacity() == 0 {
                        return Err(Error::NoWorker);
                    }
                }
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.admission.lock();
        if c.debt > 0 {
            c.debt -= 1;
            if let Some(permit) = self.permit.take() {
                permit.forget();
            }
        }
    }
}

struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        crate::metrics::queue(-1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(30);

    /// Slots go to waiters in arrival order, and capacity that shrinks while its slots are
    /// in use is retired as they come back.
    #[tokio::test]
    async fn slots_are_served_in_order_and_follow_the_capacity() {
        let admission = Arc::new(Admission::new(8));
        admission.set_capacity(2);
        let a = admission.acquire(IDLE).await.unwrap();
        let b = admission.acquire(IDLE).await.unwrap();
        admission.set_capacity(1);
        assert_eq!(admission.capacity(), 1);
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiters = Vec::new();
        for i in 0..3 {
            let (queued, order) = (admission.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let slot = queued.acquire(IDLE).await.unwrap();
                order.lock().unwrap().push(i);
                drop(slot);
            }));
            while admission.waiting() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(a); // retired: the capacity is 1 now
        tokio::task::yield_now().await;
        assert!(order.lock().unwrap().is_empty());
        drop(b);
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2]);
        assert_eq!(admission.slots.available_permits(), 1);
    }

    #[tokio::test]
    async fn without_a_queue_only_a_free_slot_admits() {
        let admission = Arc::new(Admission::new(0));
        assert!(admission.admit().is_err(), "no capacity yet");
        admission.set_capacity(1);
        assert!(admission.admit().is_ok());
        let slot = admission.acquire(IDLE).await.unwrap();
        assert!(admission.admit().is_err());
        drop(slot);
        assert!(admission.admit().is_ok());
    }

    #[tokio::test]
    async fn a_full_queue_refuses_new_requests_and_no_capacity_is_unavailable() {
        let admission = Arc::new(Admission::new(1));
        assert!(admission.admit().is_ok());
        let waiter = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.acquire(Duration::from_millis(20)).await })
        };
        while admission.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        let refused = admission.admit().unwrap_err().into_status();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        let outcome = waiter.await.unwrap().err().unwrap().into_status();
        assert_eq!(outcome.code(), tonic::Code::Unavailable);
    }
}
