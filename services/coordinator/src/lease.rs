//! One generation per session at a time: a generation holds the session's lease in the
//! store (an owner token with a TTL, renewed in the background while it runs) from its
//! plan to its last write. A second generation of the same session waits briefly (a
//! cancelled stream hands over within milliseconds), then is refused with ABORTED. The
//! lease is given up in one place, whatever ends the generation: when the [`Lease`] is
//! dropped (or, to wait for it, by [`Lease::release`]). A coordinator that dies leaves a
//! lease that expires after its TTL. A generation that cannot renew its lease (the store
//! unreachable) stops a third of the TTL before the lease would lapse, so that it never
//! runs, nor writes, while another generation may hold the session.

use std::time::{Duration, Instant};

use bd3lm_kvstore::SessionStore;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::Error;

/// How long a lease lasts and how long a generation waits for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTerms {
    /// Lifetime of a lease after its last renewal (renewed every third of it).
    pub ttl: Duration,
    /// Longest wait for a lease another generation holds.
    pub wait: Duration,
}

/// How a generation lost its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Loss {
    /// Another owner holds it.
    TakenOver,
    /// It could not be renewed before it might lapse.
    Unrenewed,
}

/// Pause between attempts at a held lease.
const POLL: Duration = Duration::from_millis(20);

/// A session's lease, held by this generation until it is dropped or released.
pub struct Lease {
    store: SessionStore,
    model: String,
    session: String,
    /// This generation's owner token; `None` once given up.
    owner: Option<String>,
    lost: watch::Receiver<Option<Loss>>,
    keeper: JoinHandle<()>,
}

impl Lease {
    /// Takes the lease of `session`, waiting up to `terms.wait` while another generation
    /// holds it; ABORTED after that.
    pub async fn take(
        store: &SessionStore,
        model: &str,
        session: &str,
        terms: LeaseTerms,
    ) -> Result<Lease, Error> {
        let owner = format!("{:032x}", rand::random::<u128>());
        let deadline = Instant::now() + terms.wait;
        while !store.lease(model, session, &owner, terms.ttl).await? {
            if Instant::now() >= deadline {
                bd3lm_telemetry::metrics::refused("session_lease");
                return Err(Error::LeaseHeld);
            }
            tokio::time::sleep(POLL).await;
        }
        let (lost_tx, lost) = watch::channel(None);
        let keeper = tokio::spawn(keep(
            store.clone(),
            [model.to_string(), session.to_string(), owner.clone()],
            terms.ttl,
            lost_tx,
        ));
        Ok(Lease {
            store: store.clone(),
            model: model.to_string(),
            session: session.to_string(),
            owner: Some(owner),
            lost,
            keeper,
        })
    }

    /// Resolves when this generation no longer holds the lease, or soon may not: with
    /// [`Error::LeaseLost`] when another owner took it, [`Error::LeaseUnrenewed`] when
    /// it could not be renewed in time.
    pub async fn lost(&mut self) -> Error {
        let loss = self.lost.wait_for(Option::is_some).await.map(|loss| *loss);
        // The keeper is gone only once the lease is given up: never while it runs.
        let Ok(loss) = loss else {
            return std::future::pending().await;
        };
        match loss {
            Some(Loss::Unrenewed) => Error::LeaseUnrenewed,
            _ => Error::LeaseLost,
        }
    }

    /// Gives the lease up and waits until the store has it.
    pub async fn release(mut self) {
        if let Some(release) = self.give_up() {
            let _ = release.await;
        }
    }

    /// Stops renewing and gives the lease up in the background (once): the one place a
    /// lease ends.
    fn give_up(&mut self) -> Option<JoinHandle<()>> {
        self.keeper.abort();
        let owner = self.owner.take()?;
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (store, model, session) =
            (self.store.clone(), self.model.clone(), self.session.clone());
        Some(runtime.spawn(async move {
            if let Err(e) = store.release(&model, &session, &owner).await {
                tracing::warn!(error = %e, "releasing the session's lease failed; it expires");
            }
        }))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.give_up();
    }
}

/// Renews the lease every third of `ttl` until another owner holds it. The lease lapses
/// in the store `ttl` after the last renewal sent; a renewal that fails (the store
/// unreachable) is tried again, but once two thirds of `ttl` passed without one the
/// generation is told to stop, while the lease is still its own.
async fn keep(
    store: SessionStore,
    [model, session, owner]: [String; 3],
    ttl: Duration,
    lost: watch::Sender<Option<Loss>>,
) {
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(ttl / 3).await;
        let (sent, deadline) = (Instant::now(), renewed + ttl * 2 / 3);
        let renewal = store.lease(&model, &session, &owner, ttl);
        match tokio::time::timeout_at(deadline.into(), renewal).await {
            Ok(Ok(true)) => renewed = sent,
            Ok(Ok(false)) => {
                tracing::warn!("the session's lease went to another generation");
                lost.send_replace(Some(Loss::TakenOver));
                return;
            }
            Ok(Err(e)) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "renewing the session's lease failed; trying again");
            }
            Ok(Err(_)) | Err(_) => {
                tracing::warn!("the session's lease could not be renewed in time; stopping");
                bd3lm_telemetry::metrics::refused("lease_unrenewed");
                lost.send_replace(Some(Loss::Unrenewed));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bd3lm_kvstore::StoreConfig;

    fn terms(ttl_ms: u64, wait_ms: u64) -> LeaseTerms {
        LeaseTerms {
            ttl: Duration::from_millis(ttl_ms),
            wait: Duration::from_millis(wait_ms),
        }
    }

    /// A held lease refuses a second generation after the wait, and hands over as soon
    /// as it is released.
    #[tokio::test]
    async fn a_held_lease_refuses_then_hands_over() {
        let store = SessionStore::memory(StoreConfig::default());
        let first = Lease::take(&store, "m", "s", terms(10_000, 0))
            .await
            .unwrap();
        let refused = Lease::take(&store, "m", "s", terms(10_000, 50)).await;
        let refused = refused.err().unwrap().into_status();
        assert_eq!(refused.code(), tonic::Code::Aborted);
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { Lease::take(&store, "m", "s", terms(10_000, 5_000)).await }
        });
        tokio::time::sleep(Duration::from_millis(60)).await;
        first.release().await;
        assert!(waiter.await.unwrap().is_ok());
    }

    /// A lease dropped on any path (an error, a panic, a cancelled task) is given up
    /// without waiting for its TTL.
    #[tokio::test]
    async fn a_dropped_lease_is_given_up() {
        let store = SessionStore::memory(StoreConfig::default());
        let lease = Lease::take(&store, "m", "s", terms(60_000, 0))
            .await
            .unwrap();
        drop(lease);
        let next = Lease::take(&store, "m", "s", terms(60_000, 5_000)).await;
        assert!(next.is_ok(), "the dropped lease was still held");
    }

    /// The keeper renews a lease past its TTL; a lease taken over is reported lost.
    #[tokio::test]
    async fn leases_are_renewed_and_losses_reported() {
        let store = SessionStore::memory(StoreConfig::default());
        let mut lease = Lease::take(&store, "m", "s", terms(90, 0)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            !store
                .lease("m", "s", "thief", Duration::from_secs(5))
                .await
                .unwrap()
        );
        lease.keeper.abort();
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(
            store
                .lease("m", "s", "thief", Duration::from_secs(5))
                .await
                .unwrap()
        );
        let (tx, rx) = watch::channel(None);
        lease.lost = rx;
        let keeper = tokio::spawn(keep(
            store.clone(),
            ["m".into(), "s".into(), lease.owner.clone().unwrap()],
            Duration::from_millis(30),
            tx,
        ));
        let loss = tokio::time::timeout(Duration::from_secs(2), lease.lost()).await;
        assert!(matches!(loss, Ok(Error::LeaseLost)), "the loss is reported");
        keeper.abort();
    }

    /// A keeper that cannot reach the store stops its generation two thirds of the TTL
    /// after its last renewal, before the lease lapses: the store gets no write from it
    /// after another could have taken the session over.
    #[tokio::test]
    async fn a_lease_that_cannot_be_renewed_stops_its_generation_before_it_lapses() {
        // Nothing listens on port 9: every renewal fails after the store's retries.
        let unreachable =
            bd3lm_kvstore::RedisConnection::open("redis://127.0.0.1:9", Default::default())
                .unwrap();
        let store = SessionStore::redis(&unreachable, StoreConfig::default());
        let (tx, mut rx) = watch::channel(None);
        let ttl = Duration::from_secs(3);
        let started = Instant::now();
        let keeper = tokio::spawn(keep(store, ["m".into(), "s".into(), "o".into()], ttl, tx));
        let stopped = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some));
        assert_eq!(*stopped.await.unwrap().unwrap(), Some(Loss::Unrenewed));
        assert!(
            started.elapsed() < ttl,
            "stopped {:?} after the last renewal",
            started.elapsed()
        );
        keeper.abort();
    }
}
