//! One generation per session at a time: a generation holds the session's lease in the
//! store (an owner token with a TTL, renewed in the background while it runs) from its
//! plan to its last write. A second generation of the same session waits briefly (a
//! cancelled stream hands over within milliseconds), then is refused with ABORTED. The
//! lease is given up in one place, whatever ends the generation: when the [`Lease`] is
//! dropped (or, to wait for it, by [`Lease::release`]). A coordinator that dies leaves a
//! lease that expires after its TTL.

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

/// Pause between attempts at a held lease.
const POLL: Duration = Duration::from_millis(20);

/// A session's lease, held by this generation until it is dropped or released.
pub struct Lease {
    store: SessionStore,
    model: String,
    session: String,
    /// This generation's owner token; `None` once given up.
    owner: Option<String>,
    lost: watch::Receiver<bool>,
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
        let (lost_tx, lost) = watch::channel(false);
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

    /// Resolves when another owner took the lease (this one expired unrenewed).
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
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

/// Renews the lease every third of `ttl` until another owner holds it. A store that does
/// not answer is tried again: the generation cannot commit meanwhile either.
async fn keep(
    store: SessionStore,
    [model, session, owner]: [String; 3],
    ttl: Duration,
    lost: watch::Sender<bool>,
) {
    loop {
        tokio::time::sleep(ttl / 3).await;
        match store.lease(&model, &session, &owner, ttl).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!("the session's lease went to another generation");
                lost.send_replace(true);
                return;
            }
            Err(e) => tracing::warn!(error = %e, "renewing the session's lease failed"),
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
        let (tx, rx) = watch::channel(false);
        lease.lost = rx;
        let keeper = tokio::spawn(keep(
            store.clone(),
            ["m".into(), "s".into(), lease.owner.clone().unwrap()],
            Duration::from_millis(30),
            tx,
        ));
        tokio::time::timeout(Duration::from_secs(2), lease.lost())
            .await
            .expect("the loss is reported");
        keeper.abort();
    }
}
