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
    }
}

/// Exercises `store` (which must not hold session `s1` of model `m`) and panics on the
/// first broken promise: create once, read per model, compare-and-set commit with its
/// blobs, superseded commits, missing sessions, deletion with the blobs.
pub async fn check(store: Store) {
    let r = record("s1");
    store.create_session(&r).await.unwrap();
    assert!(matches!(
        store.create_session(&r).await,
        Err(Error::SessionExists(_))
    ));
    assert_eq!(store.get_session("m", "s1").await.unwrap(), Some(r.clone()));
    assert_eq!(store.get_session("other-model", "s1").await.unwrap(), None);
    let mut next = r.clone();
    next.committed_blocks = 1;
    next.tokens.push(4);
    let outcome = store
        .commit(&next, 0, vec![(0, b"blob0".to_vec())], 0..0)
        .await
        .unwrap();
    assert_eq!(outcome, CommitOutcome::Committed);
    let stale = store.commit(&next, 0, vec![], 0..1).await.unwrap();
    assert_eq!(stale, CommitOutcome::Superseded(next.clone()));
    assert_eq!(
        store.get_blobs("m", "s1", &[0, 1]).await.unwrap(),
        vec![Some(b"blob0".to_vec()), None],
        "a superseded commit deletes nothing"
    );
    let mut later = next.clone();
    later.committed_blocks = 2;
    let blob1 = (1, b"blob1".to_vec());
    let outcome = store.commit(&later, 1, vec![blob1], 0..1).await.unwrap();
    assert_eq!(outcome, CommitOutcome::Committed);
    assert_eq!(
        store.get_blobs("m", "s1", &[0, 1]).await.unwrap(),
        vec![None, Some(b"blob1".to_vec())],
        "the expired blob goes with the commit"
    );
    assert!(matches!(
        store.commit(&record("nope"), 0, vec![], 0..0).await,
        Err(Error::NoSession(_))
    ));
    assert!(store.delete_session("m", "s1", 2).await.unwrap());
    assert!(!store.delete_session("m", "s1", 2).await.unwrap());
    assert_eq!(store.get_blobs("m", "s1", &[1]).await.unwrap(), vec![None]);
}
