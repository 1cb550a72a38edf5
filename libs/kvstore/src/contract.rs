//! The contract every [`Store`] keeps, as one function: the unit tests run it on the
//! in-memory store and the end-to-end tests on a real `redis-server` (feature `contract`).

use crate::{CommitOutcome, Error, SessionRecord, Store};
use bd3lm_sampling::SamplingParams;

/// A small session record of model `m`.
pub fn record(id: &str) -> SessionRecord {
    SessionRecord {
        id: id.into(),
        model_id: "m".into(),
        tokens: vec![1, 2, 3],
        prompt_len: 3,
        committed_blocks: 0,
        seed: 9,
        sampling: SamplingParams::new(4),
        returned: 3,
        version: 0,
        owner: None,
    }
}

/// Exercises `store` (which must not hold session `s1` of model `m`) and panics on the
/// first broken promise: create once, read per model, compare-and-set writes with their
/// blobs, stale writers, appended tokens, leases, per-key session counts, missing
/// sessions, deletion with the blobs and its tombstone.
pub async fn check(store: Store) {
    let r = record("s1");
    assert_eq!(store.create_session(&r).await.unwrap(), 1);
    assert!(matches!(
        store.create_session(&r).await,
        Err(Error::SessionExists(_))
    ));
    let stored = store.get_session("m", "s1").await.unwrap().unwrap();
    assert_eq!((stored.version, &stored.tokens), (1, &r.tokens));
    assert_eq!(store.get_session("other-model", "s1").await.unwrap(), None);

    let mut next = stored.clone();
    next.committed_blocks = 1;
    next.tokens.push(4);
    let outcome = store
        .commit(&next, stored.base(), vec![(0, b"blob0".to_vec())], 0..0)
        .await
        .unwrap();
    assert_eq!(outcome, CommitOutcome::Committed(2));
    let mut current = store.get_session("m", "s1").await.unwrap().unwrap();
    next.version = 2;
    assert_eq!(current, next, "the appended token is stored");

    // A writer that read version 1 (a stale block, a stale prompt) changes nothing.
    let mut stale = stored.clone();
    stale.tokens.extend([7, 7]);
    let lost = store.commit(&stale, stored.base(), vec![(1, b"stale".to_vec())], 0..1);
    assert_eq!(lost.await.unwrap(), CommitOutcome::Superseded(next.clone()));
    assert_eq!(
        store.get_blobs("m", "s1", &[0, 1]).await.unwrap(),
        vec![Some(b"blob0".to_vec()), None],
        "a superseded commit writes and deletes nothing"
    );

    current.committed_blocks = 2;
    current.returned = 4;
    let blob1 = (1, b"blob1".to_vec());
    let outcome = store.commit(&current, next.base(), vec![blob1], 0..1).await;
    assert_eq!(outcome.unwrap(), CommitOutcome::Committed(3));
    assert_eq!(
        store.get_blobs("m", "s1", &[0, 1]).await.unwrap(),
        vec![None, Some(b"blob1".to_vec())],
        "the expired blob goes with the commit"
    );
    let stored = store.get_session("m", "s1").await.unwrap().unwrap();
    assert_eq!((stored.version, stored.returned), (3, 4));
    assert!(matches!(
        store
            .update_session(&record("nope"), record("nope").base())
            .await,
        Err(Error::NoSession(_))
    ));

    let ttl = std::time::Duration::from_secs(5);
    assert!(store.lease("m", "s1", "a", ttl).await.unwrap());
    assert!(store.lease("m", "s1", "a", ttl).await.unwrap(), "renewed");
    assert!(!store.lease("m", "s1", "b", ttl).await.unwrap());
    store.release("m", "s1", "b").await.unwrap();
    assert!(
        !store.lease("m", "s1", "b", ttl).await.unwrap(),
        "not b's to give up"
    );
    store.release("m", "s1", "a").await.unwrap();
    assert!(store.lease("m", "s1", "b", ttl).await.unwrap());

    assert!(store.claim_slot("m", "k1", "a", 2).await.unwrap());
    assert!(store.claim_slot("m", "k1", "b", 2).await.unwrap());
    assert!(
        store.claim_slot("m", "k1", "a", 2).await.unwrap(),
        "a is counted already"
    );
    assert!(
        !store.claim_slot("m", "k1", "c", 2).await.unwrap(),
        "over the limit"
    );
    assert!(
        store.claim_slot("m", "k2", "c", 2).await.unwrap(),
        "another key's count"
    );
    store.release_slot("m", "k1", "b").await.unwrap();
    assert!(store.claim_slot("m", "k1", "c", 2).await.unwrap());

    assert!(store.delete_session("m", "s1").await.unwrap());
    assert!(!store.delete_session("m", "s1").await.unwrap());
    assert_eq!(store.get_blobs("m", "s1", &[1]).await.unwrap(), vec![None]);
    assert!(
        store.lease("m", "s1", "c", ttl).await.unwrap(),
        "the lease went too"
    );
    assert!(
        matches!(store.create_session(&r).await, Err(Error::Deleted(_))),
        "a deleted session is never put back"
    );
    assert!(matches!(
        store.update_session(&stored, stored.base()).await,
        Err(Error::NoSession(_))
    ));
}
