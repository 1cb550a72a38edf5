//! The session store in process memory: a map with per-key expiry, under one lock (so
//! every operation is atomic, as the Redis scripts are).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Keys, Write, Written};
use crate::{Error, Result, SessionRecord};

/// A stored value.
enum Value {
    Bytes(Vec<u8>),
    Record(SessionRecord),
    /// Sessions counted for an API key, each until its expiry.
    Slots(HashMap<String, Instant>),
}

/// Values by key, each with its expiry.
type Entries = HashMap<String, (Value, Instant)>;

/// The in-memory sessions. Cloning shares the map.
#[derive(Clone)]
pub(super) struct MemorySessions {
    ttl: Duration,
    entries: Arc<Mutex<Entries>>,
}

/// The live value at `key`.
fn live<'m>(map: &'m Entries, key: &str) -> Option<&'m Value> {
    map.get(key)
        .filter(|(_, expiry)| *expiry > Instant::now())
        .map(|(v, _)| v)
}

impl MemorySessions {
    pub(super) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Arc::default(),
        }
    }

    fn map(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops every key.
    #[cfg(any(test, feature = "contract"))]
    pub(super) fn clear(&self) {
        self.map().clear();
    }

    fn insert(&self, map: &mut Entries, key: &str, value: Value, ttl: Duration) {
        let now = Instant::now();
        // Expired entries are dropped as writes go by, so memory follows the live set.
        if map.len().is_multiple_of(64) {
            map.retain(|_, (_, expiry)| *expiry > now);
        }
        map.insert(key.to_string(), (value, now + ttl));
    }

    pub(super) fn bytes(&self, key: &str) -> Option<Vec<u8>> {
        match live(&self.map(), key) {
            Some(Value::Bytes(b)) => Some(b.clone()),
            _ => None,
        }
    }

    pub(super) fn holds(&self, key: &str) -> bool {
        matches!(live(&self.map(), key), Some(Value::Bytes(_)))
    }

    /// Writes every (key, bytes) of `blobs`, each for the TTL.
    pub(super) fn put_all(&self, blobs: Vec<(String, Vec<u8>)>) {
        let mut map = self.map();
        for (key, bytes) in blobs {
            self.insert(&mut map, &key, Value::Bytes(bytes), self.ttl);
        }
    }

    pub(super) fn record(&self, key: &str) -> Option<SessionRecord> {
        match live(&self.map(), key) {
            Some(Value::Record(r)) => Some(r.clone()),
            _ => None,
        }
    }

    pub(super) fn create(&self, keys: &Keys, record: &SessionRecord, version: u64) -> Result<()> {
        let mut map = self.map();
        if live(&map, &keys.tombstone).is_some() {
            return Err(Error::Deleted(record.id.clone()));
        }
        if live(&map, &keys.record).is_some() {
            return Err(Error::SessionExists(record.id.clone()));
        }
        let mut stored = record.clone();
        stored.version = version;
        self.insert(&mut map, &keys.record, Value::Record(stored), self.ttl);
        Ok(())
    }

    pub(super) fn commit(&self, keys: &Keys, write: Write<'_>) -> Result<Written> {
        let mut map = self.map();
        let current = match live(&map, &keys.record) {
            Some(Value::Record(r)) => r.clone(),
            _ => return Ok(Err(None)),
        };
        if current.base() != write.base {
            return Ok(Err(Some(current)));
        }
        let mut next = write.record.clone();
        next.version = current.version + 1;
        let version = next.version;
        for (k, v) in write.blobs {
            self.insert(&mut map, &k, Value::Bytes(v), self.ttl);
        }
        self.insert(&mut map, &keys.record, Value::Record(next), self.ttl);
        for k in &write.expired {
            map.remove(k);
        }
        Ok(Ok(version))
    }

    pub(super) fn delete(
        &self,
        keys: &Keys,
        doomed: Vec<String>,
        blobs: impl Fn(Range<usize>) -> Vec<String>,
    ) -> bool {
        let mut map = self.map();
        let blocks = match live(&map, &keys.record) {
            Some(Value::Record(r)) => Some(r.committed_blocks),
            _ => None,
        };
        for k in doomed.iter().chain(&blobs(0..blocks.unwrap_or(0))) {
            map.remove(k);
        }
        self.insert(
            &mut map,
            &keys.tombstone,
            Value::Bytes(Vec::new()),
            self.ttl,
        );
        blocks.is_some()
    }

    pub(super) fn claim_slot(&self, key: &str, session: &str, limit: usize) -> bool {
        let mut map = self.map();
        let now = Instant::now();
        // Taken out and put back, not copied: a key may count thousands of sessions.
        let mut slots = match map.remove(key) {
            Some((Value::Slots(s), expiry)) if expiry > now => s,
            _ => HashMap::new(),
        };
        slots.retain(|_, expiry| *expiry > now);
        let counted = slots.contains_key(session) || slots.len() < limit;
        if counted {
            slots.insert(session.to_string(), now + self.ttl);
        }
        self.insert(&mut map, key, Value::Slots(slots), self.ttl);
        counted
    }

    pub(super) fn release_slot(&self, key: &str, session: &str) {
        let mut map = self.map();
        if let Some((Value::Slots(slots), _)) = map.get_mut(key) {
            slots.remove(session);
        }
    }

    pub(super) fn lease(&self, key: &str, owner: &str, ttl: Duration) -> bool {
        let mut map = self.map();
        match live(&map, key) {
            Some(Value::Bytes(held)) if held != owner.as_bytes() => false,
            _ => {
                self.insert(&mut map, key, Value::Bytes(owner.as_bytes().to_vec()), ttl);
                true
            }
        }
    }

    pub(super) fn release(&self, key: &str, owner: &str) {
        let mut map = self.map();
        if matches!(live(&map, key), Some(Value::Bytes(held)) if held == owner.as_bytes()) {
            map.remove(key);
        }
    }
}
