//! The contracts the two stores keep, one function each ([`check`] for a
//! [`SessionStore`], [`check_jobs`] for a [`JobStore`]): the unit tests run them on the
//! in-memory backends and the end-to-end tests on a real `redis-server` (feature
//! `contract`).

use crate::{CommitOutcome, Error, JobStore, PrefixScope, SessionRecord, SessionStore};
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
        model_version: None,
    }
}

/// Exercises `store` (which must not hold sessions `s1` and `s2` of model `m`) and panics
/// on the first broken promise: create once, read per model, compare-and-set writes with
/// their blobs, windows read back whole, stale writers, appended tokens, leases, per-key
/// session counts, missing sessions, deletion with the blobs and its tombstone, shared
/// prompt blocks by content and model state.
pub async fn check(store: SessionStore) {
    check_prefix_blobs(&store).await;
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
    assert_eq!(
        lost.await.unwrap(),
        CommitOutcome::Superseded(Box::new(next.clone()))
    );
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

    // A window wider than one read comes back whole, in the order asked, gaps included.
    let wide = record("s2");
    store.create_session(&wide).await.unwrap();
    let mut grown = store.get_session("m", "s2").await.unwrap().unwrap();
    grown.committed_blocks = 40;
    let blob = |b: usize| format!("blob{b}").into_bytes();
    let blobs = (0..40).map(|b| (b, blob(b))).collect();
    let outcome = store.commit(&grown, grown.base(), blobs, 0..0).await;
    assert_eq!(outcome.unwrap(), CommitOutcome::Committed(2));
    let wanted: Vec<usize> = (0..41).rev().collect();
    let expected: Vec<_> = wanted.iter().map(|&b| (b < 40).then(|| blob(b))).collect();
    assert_eq!(store.get_blobs("m", "s2", &wanted).await.unwrap(), expected);
    assert!(store.delete_session("m", "s2").await.unwrap());
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

/// Shared prompt blocks are found by their addresses (the first block's among them) and
/// model state only, and a block past the prompt's addresses is refused.
async fn check_prefix_blobs(store: &SessionStore) {
    let scope = PrefixScope {
        model: "m",
        fingerprint: "f",
    };
    let addresses = [11, 12, 13];
    let blobs = vec![(0, b"p0".to_vec()), (2, b"p2".to_vec())];
    store
        .put_prefix_blobs(scope, &addresses, blobs)
        .await
        .unwrap();
    let held = store.held_prefix_blocks(scope, &addresses).await.unwrap();
    assert_eq!(held, [true, false, true]);
    let read = store
        .get_prefix_blobs(scope, &addresses, 1..3)
        .await
        .unwrap();
    assert_eq!(read, [None, Some(b"p2".to_vec())]);
    let other_state = PrefixScope {
        fingerprint: "g",
        ..scope
    };
    let none = [false; 3];
    assert_eq!(
        store
            .held_prefix_blocks(other_state, &addresses)
            .await
            .unwrap(),
        none
    );
    // Another first block: another prompt, though the later addresses match.
    let other_prompt = store
        .held_prefix_blocks(scope, &[99, 12, 13])
        .await
        .unwrap();
    assert_eq!(other_prompt, none);
    let past = store.put_prefix_blobs(scope, &addresses, vec![(3, b"p3".to_vec())]);
    assert!(matches!(past.await, Err(Error::Corrupt(_))));
}

/// Submits job `id` without a quota: whether it was queued.
async fn queued(store: &JobStore, id: &str, body: &[u8]) -> bool {
    let submitted = store.submit_job(id, body, None).await.unwrap();
    matches!(submitted, crate::Submitted::Queued { .. })
}

/// Exercises the jobs, the queue and the registry of `store` (which must hold none):
/// records by revision, claims that lapse and move to another trainer, touches that fail
/// once another trainer holds the entry, a waiting claim woken by a submission, versions
/// written once, retired and pinned, the change notifications of records, and a quota
/// of open jobs held under a concurrent burst.
pub async fn check_jobs(store: JobStore) {
    use std::time::Duration;
    let lease = Duration::from_secs(60);
    assert!(store.list_jobs(10).await.unwrap().is_empty());
    assert!(queued(&store, "j1", b"one").await);
    assert!(!queued(&store, "j1", b"again").await, "ids are unique");
    assert!(queued(&store, "j2", b"two").await);
    let listed = store.list_jobs(10).await.unwrap();
    let bodies: Vec<&[u8]> = listed.iter().map(|r| r.body.as_slice()).collect();
    assert_eq!(bodies, [b"two".as_slice(), b"one"], "newest first");
    assert_eq!(store.list_jobs(1).await.unwrap().len(), 1);

    let j1 = store.get_job("j1").await.unwrap().unwrap();
    assert_eq!((j1.revision, j1.body.as_slice()), (1, b"one".as_slice()));
    assert_eq!(
        store.update_job("j1", 1, b"one'", None).await.unwrap(),
        Some(2)
    );
    assert_eq!(
        store.update_job("j1", 1, b"stale", None).await.unwrap(),
        None
    );
    assert_eq!(store.update_job("nope", 1, b"x", None).await.unwrap(), None);
    assert_eq!(store.get_job("j1").await.unwrap().unwrap().body, b"one'");

    let a = store.claim_job("a", lease).await.unwrap().unwrap();
    assert_eq!((a.job_id.as_str(), a.deliveries), ("j1", 1), "oldest first");
    let b = store.claim_job("b", lease).await.unwrap().unwrap();
    assert_eq!(b.job_id, "j2");
    assert_eq!(store.claim_job("c", lease).await.unwrap(), None);
    assert!(store.touch_job(&a, "a").await.unwrap());
    assert!(!store.touch_job(&a, "b").await.unwrap(), "not b's entry");

    // Trainer a stops touching j1: with the lease lapsed, c takes it over.
    let c = store.claim_job("c", Duration::ZERO).await.unwrap().unwrap();
    assert_eq!((c.entry.as_str(), c.deliveries), (a.entry.as_str(), 2));
    assert!(!store.touch_job(&a, "a").await.unwrap(), "a lost it");
    assert!(store.touch_job(&c, "c").await.unwrap());
    // Trainer c stops gracefully and hands j1 back: e takes it at once, within the
    // lease, and c's stop is not counted among its deliveries.
    assert!(
        !store.release_job(&c, "a").await.unwrap(),
        "not a's to hand back"
    );
    assert!(store.release_job(&c, "c").await.unwrap());
    let e = store.claim_job("e", lease).await.unwrap().unwrap();
    assert_eq!((e.entry.as_str(), e.deliveries), (a.entry.as_str(), 2));
    assert!(!store.touch_job(&c, "c").await.unwrap(), "c let it go");
    let c = e;
    store.finish_job(&c).await.unwrap();
    store.finish_job(&b).await.unwrap();
    assert_eq!(store.claim_job("d", Duration::ZERO).await.unwrap(), None);

    // A trainer waiting on the empty queue takes a job submitted while it waits, long
    // before its wait ends; with nothing submitted the wait ends empty.
    let idle = store.wait_for_job("d", lease, Duration::from_millis(100));
    assert_eq!(idle.await.unwrap(), None);
    let waiting = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .wait_for_job("d", lease, Duration::from_secs(60))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(queued(&store, "j3", b"three").await);
    let woken = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("a submission wakes the waiting trainer")
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!((woken.job_id.as_str(), woken.deliveries), ("j3", 1));
    assert!(store.touch_job(&woken, "d").await.unwrap());
    store.finish_job(&woken).await.unwrap();

    // Oldest first, by pages.
    let oldest = store.oldest_jobs(0, 1).await.unwrap();
    assert_eq!(oldest.len(), 1);
    let second = store.oldest_jobs(1, 10).await.unwrap();
    assert!(second.iter().all(|j| j.body != oldest[0].body));
    assert_eq!(second.len() + 1, store.list_jobs(100).await.unwrap().len());

    // A job record is deleted at the revision read, and leaves the listing.
    let j3 = store.get_job("j3").await.unwrap().unwrap();
    assert!(
        !store.delete_job("j3", j3.revision + 1).await.unwrap(),
        "a stale revision"
    );
    assert!(store.delete_job("j3", j3.revision).await.unwrap());
    assert_eq!(store.get_job("j3").await.unwrap(), None);
    assert!(
        store
            .list_jobs(10)
            .await
            .unwrap()
            .iter()
            .all(|j| j.body != b"three")
    );
    assert!(!store.delete_job("j3", j3.revision).await.unwrap(), "gone");

    // A new name goes to its first claimant; a name published before names had owners
    // stays unowned.
    assert_eq!(
        store
            .claim_model_name("fresh", "k1")
            .await
            .unwrap()
            .as_deref(),
        Some("k1")
    );
    assert_eq!(
        store
            .claim_model_name("fresh", "k2")
            .await
            .unwrap()
            .as_deref(),
        Some("k1")
    );
    assert!(store.record_model_version("old", 1, b"v1").await.unwrap());
    assert_eq!(store.claim_model_name("old", "k2").await.unwrap(), None);

    assert_eq!(store.next_model_version("m").await.unwrap(), 1);
    assert_eq!(store.next_model_version("m").await.unwrap(), 2);
    assert!(store.record_model_version("m", 2, b"v2").await.unwrap());
    assert!(!store.record_model_version("m", 2, b"other").await.unwrap());
    assert!(store.record_model_version("m", 1, b"v1").await.unwrap());
    let versions = store.model_versions("m").await.unwrap();
    assert_eq!(versions, vec![(1, b"v1".to_vec()), (2, b"v2".to_vec())]);
    assert!(store.model_versions("other").await.unwrap().is_empty());
    assert_eq!(
        store.model_names().await.unwrap(),
        vec!["m".to_string(), "old".to_string()]
    );
    assert_eq!(
        store.model_owner("fresh").await.unwrap().as_deref(),
        Some("k1")
    );
    assert_eq!(store.model_owner("old").await.unwrap(), None);

    // A pinned version stays; an unpinned one is retired once, its files queued for
    // removal; the name goes from the listing with its last version.
    use crate::Retirement;
    assert!(store.pin_model_version("m", 1, true).await.unwrap());
    assert!(
        !store.pin_model_version("m", 9, true).await.unwrap(),
        "no such version"
    );
    assert_eq!(store.model_pins("m").await.unwrap(), vec![1]);
    assert_eq!(
        store.retire_model_version("m", 1).await.unwrap(),
        Retirement::Pinned
    );
    assert_eq!(
        store.retire_model_version("m", 2).await.unwrap(),
        Retirement::Retired(b"v2".to_vec())
    );
    assert_eq!(
        store.retire_model_version("m", 2).await.unwrap(),
        Retirement::NotFound
    );
    assert!(
        !store.pin_model_version("m", 2, true).await.unwrap(),
        "retired"
    );
    assert!(store.pin_model_version("m", 1, false).await.unwrap());
    assert!(store.model_pins("m").await.unwrap().is_empty());
    assert!(matches!(
        store.retire_model_version("m", 1).await.unwrap(),
        Retirement::Retired(_)
    ));
    assert_eq!(store.model_names().await.unwrap(), vec!["old".to_string()]);
    assert!(store.model_versions("m").await.unwrap().is_empty());
    let mut retired = store.retired_model_versions().await.unwrap();
    retired.sort();
    assert_eq!(retired, vec![("m".to_string(), 1), ("m".to_string(), 2)]);
    store.forget_retired_model_version("m", 1).await.unwrap();
    let retired = store.retired_model_versions().await.unwrap();
    assert_eq!(retired, vec![("m".to_string(), 2)]);
    assert_eq!(
        store.next_model_version("m").await.unwrap(),
        3,
        "numbers never reused"
    );

    // Watchers see each update and deletion after their cursor, a waiting one at once.
    let mut cursor = store.job_changes_cursor().await.unwrap();
    let quiet = std::time::Duration::from_millis(50);
    assert!(
        store
            .job_changes(&mut cursor, quiet)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(queued(&store, "w1", b"w").await);
    let waiting = {
        let (store, mut cursor) = (store.clone(), cursor.clone());
        tokio::spawn(async move {
            let long = std::time::Duration::from_secs(30);
            let changed = store.job_changes(&mut cursor, long).await;
            (changed.unwrap(), cursor)
        })
    };
    // The waiter may not block yet: either way it sees the update.
    assert_eq!(
        store.update_job("w1", 1, b"w2", None).await.unwrap(),
        Some(2)
    );
    let (changed, after) = waiting.await.unwrap();
    assert_eq!(changed, vec!["w1".to_string()]);
    assert!(store.delete_job("w1", 2).await.unwrap());
    let mut later = after.clone();
    let changed = store.job_changes(&mut later, quiet).await.unwrap();
    assert_eq!(changed, vec!["w1".to_string()]);
    assert!(
        store
            .job_changes(&mut later, quiet)
            .await
            .unwrap()
            .is_empty()
    );
    let both = store.job_changes(&mut cursor, quiet).await.unwrap();
    assert_eq!(both.len(), 2, "both, in order: {both:?}");

    // A burst of one owner's submissions is queued up to its limit and no further; a job
    // that ends gives its place back.
    use crate::{Quota, Submitted};
    let burst = (0..12).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let quota = Quota {
                owner: "k",
                limit: 3,
            };
            store
                .submit_job(&format!("q{i}"), b"q", Some(quota))
                .await
                .unwrap()
        })
    });
    let outcomes = futures::future::join_all(burst).await;
    let queued: Vec<usize> = (0..12)
        .filter(|i| matches!(outcomes[*i].as_ref().unwrap(), Submitted::Queued { .. }))
        .collect();
    assert_eq!(queued.len(), 3, "{outcomes:?}");
    let refused = outcomes
        .iter()
        .filter(|o| matches!(o.as_ref().unwrap(), Submitted::OverQuota { open: 3 }));
    assert_eq!(refused.count(), 9);
    let quota = Some(Quota {
        owner: "k",
        limit: 3,
    });
    let ended = format!("q{}", queued[0]);
    assert_eq!(
        store
            .update_job(&ended, 1, b"ended", Some("k"))
            .await
            .unwrap(),
        Some(2)
    );
    let after = store.submit_job("q-after", b"q", quota).await.unwrap();
    assert_eq!(after, Submitted::Queued { open: 3 });
    let other = Some(Quota {
        owner: "j",
        limit: 3,
    });
    assert_eq!(
        store.submit_job("j-1", b"j", other).await.unwrap(),
        Submitted::Queued { open: 1 }
    );
    assert_eq!(
        store.submit_job("j-1", b"j", other).await.unwrap(),
        Submitted::Exists
    );
}
