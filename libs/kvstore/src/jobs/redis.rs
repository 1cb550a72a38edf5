//! The job store in Redis: the queue is a stream with a consumer group, and each write a
//! server-side script (in `scripts/`) over keys of one Cluster slot.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{AsyncCommands, Script};

use super::{JobClaim, JobKeys, Quota, Retirement, Revised, Submitted};
use crate::now_ms;
use crate::{Error, RedisConnection, Result};

/// The consumer group of the trainers.
const GROUP: &str = "trainers";

static SUBMIT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/submit.lua")));
static UPDATE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/update.lua")));
static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/claim.lua")));
static FINISH: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/finish.lua")));
static TOUCH: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/touch.lua")));
static DELETE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/delete.lua")));
static CLAIM_NAME: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/claim_name.lua")));
static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/release.lua")));
static RECORD_VERSION: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/record_version.lua")));
static RETIRE_VERSION: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/retire_version.lua")));
static PIN_VERSION: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/pin_version.lua")));

/// The jobs, queue and registry in Redis.
#[derive(Clone)]
pub(super) struct RedisJobs {
    redis: RedisConnection,
}

impl RedisJobs {
    pub(super) fn new(redis: RedisConnection) -> Self {
        Self { redis }
    }

    pub(super) async fn submit_job(
        &self,
        keys: &JobKeys,
        id: &str,
        body: &[u8],
        quota: Option<Quota<'_>>,
    ) -> Result<Submitted> {
        self.ensure_group(&keys.queue()).await?;
        let (job, index, queue) = (keys.job(id), keys.index(), keys.queue());
        let (owner, limit) = quota.map_or(("", 0), |q| (q.owner, q.limit));
        // Without an owner the set is never touched; a key of the slot all the same.
        let open = keys.open(owner);
        let (outcome, count): (i64, usize) = self
            .redis
            .retried("submit_job", |mut con| {
                let mut call = SUBMIT.key(&job);
                call.key(&index).key(&queue).key(&open);
                call.arg(id).arg(body).arg(now_ms()).arg(owner).arg(limit);
                async move { call.invoke_async(&mut con).await }
            })
            .await?;
        Ok(match outcome {
            1 => Submitted::Queued { open: count },
            2 => Submitted::OverQuota { open: count },
            _ => Submitted::Exists,
        })
    }

    /// Creates the trainers' group (and the stream) unless it exists.
    async fn ensure_group(&self, queue: &str) -> Result<()> {
        let created: redis::RedisResult<()> = self
            .redis
            .retried("create_group", |mut con| async move {
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(queue)
                    .arg(GROUP)
                    .arg("0")
                    .arg("MKSTREAM")
                    .query_async(&mut con)
                    .await
            })
            .await;
        match created {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            other => Ok(other?),
        }
    }

    pub(super) async fn delete_job(&self, keys: &JobKeys, id: &str, revision: u64) -> Result<bool> {
        let (job, index, changes) = (keys.job(id), keys.index(), keys.changes());
        let deleted: i64 = self
            .redis
            .retried("delete_job", |mut con| {
                let mut call = DELETE.key(&job);
                call.key(&index).key(&changes).arg(id).arg(revision);
                async move { call.invoke_async(&mut con).await }
            })
            .await?;
        Ok(deleted == 1)
    }

    pub(super) async fn get_job(&self, key: &str) -> Result<Option<Revised>> {
        let (revision, body): (Option<u64>, Option<Vec<u8>>) = self
            .redis
            .retried("get_job", |mut con| async move {
                redis::cmd("HMGET")
                    .arg(key)
                    .arg("rev")
                    .arg("body")
                    .query_async(&mut con)
                    .await
            })
            .await?;
        Ok(revision
            .zip(body)
            .map(|(revision, body)| Revised { revision, body }))
    }

    /// `limit` job records from place `from` of the index, newest first or oldest first.
    pub(super) async fn list_jobs(
        &self,
        keys: &JobKeys,
        (from, limit): (usize, usize),
        newest_first: bool,
    ) -> Result<Vec<Revised>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let index = keys.index();
        let (start, stop) = (from as isize, (from + limit) as isize - 1);
        let ids: Vec<String> = self
            .redis
            .retried("list_jobs", |mut con| {
                let index = &index;
                async move {
                    if newest_first {
                        con.zrevrange(index, start, stop).await
                    } else {
                        con.zrange(index, start, stop).await
                    }
                }
            })
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // One round trip for all of them.
        let mut read = redis::pipe();
        for id in &ids {
            read.cmd("HMGET").arg(keys.job(id)).arg("rev").arg("body");
        }
        type Parts = (Option<u64>, Option<Vec<u8>>);
        let parts: Vec<Parts> = self
            .redis
            .retried("list_jobs", |mut con| {
                let read = &read;
                async move { read.query_async(&mut con).await }
            })
            .await?;
        Ok(parts
            .into_iter()
            .filter_map(|(revision, body)| {
                Some(Revised {
                    revision: revision?,
                    body: body?,
                })
            })
            .collect())
    }

    pub(super) async fn update_job(
        &self,
        keys: &JobKeys,
        id: &str,
        (revision, body): (u64, &[u8]),
        ends_for: Option<&str>,
    ) -> Result<Option<u64>> {
        let (job, changes) = (keys.job(id), keys.changes());
        let open = ends_for.map(|owner| keys.open(owner));
        self.redis
            .retried("update_job", |mut con| {
                let mut call = UPDATE.key(&job);
                call.key(&changes);
                if let Some(open) = &open {
                    call.key(open);
                }
                call.arg(revision).arg(body).arg(id);
                async move { call.invoke_async(&mut con).await }
            })
            .await
            .map_err(Error::from)
    }

    /// The id of the changes stream's last entry ("0-0" while it has none): where a
    /// watcher starts.
    pub(super) async fn last_change(&self, changes: &str) -> Result<String> {
        let last: Vec<(String, Vec<(String, String)>)> = self
            .redis
            .retried("job_changes", |mut con| async move {
                redis::cmd("XREVRANGE")
                    .arg(changes)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut con)
                    .await
            })
            .await?;
        Ok(last.into_iter().next().map_or("0-0".into(), |(id, _)| id))
    }

    /// Blocks up to `wait` on a connection of its own for changes after `cursor`: the
    /// changed job ids and the new cursor.
    pub(super) async fn changes_after(
        &self,
        changes: &str,
        cursor: &str,
        wait: Duration,
    ) -> Result<(Vec<String>, String)> {
        let mut con = self.redis.dedicated(wait).await?;
        type Entries = Vec<(String, Vec<(String, Vec<String>)>)>;
        let read: Option<Entries> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1000)
            .arg("BLOCK")
            .arg(wait.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(changes)
            .arg(cursor)
            .query_async(&mut con)
            .await?;
        let entries: Vec<_> = read.into_iter().flatten().flat_map(|(_, e)| e).collect();
        let next = entries
            .last()
            .map_or(cursor.to_string(), |(id, _)| id.clone());
        // Each entry's fields are `job <id>`, as the scripts wrote them.
        let ids = entries
            .into_iter()
            .filter_map(|(_, fields)| fields.into_iter().nth(1))
            .collect();
        Ok((ids, next))
    }

    pub(super) async fn claim_job(
        &self,
        queue: &str,
        trainer: &str,
        lease: Duration,
    ) -> Result<Option<JobClaim>> {
        self.ensure_group(queue).await?;
        let claimed: Option<(String, String, u64)> = self
            .redis
            .retried("claim_job", |mut con| {
                let mut call = CLAIM.key(queue);
                call.arg(GROUP).arg(trainer).arg(lease.as_millis() as u64);
                async move { call.invoke_async(&mut con).await }
            })
            .await?;
        Ok(claimed.map(|(entry, job_id, deliveries)| JobClaim {
            job_id,
            entry,
            deliveries,
        }))
    }

    /// Blocks up to `wait` for an entry never taken, on a connection of its own, and takes
    /// it for `trainer` (`XREADGROUP ... BLOCK`: one added while the call waits is taken
    /// at once); `None` when none came. Called right after [`RedisJobs::claim_job`],
    /// which made sure the group exists.
    pub(super) async fn wait_for_new(
        &self,
        queue: &str,
        trainer: &str,
        wait: Duration,
    ) -> Result<Option<JobClaim>> {
        let mut con = self.redis.dedicated(wait).await?;
        type Entries = Vec<(String, Vec<(String, Vec<String>)>)>;
        let read: Option<Entries> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(trainer)
            .arg("COUNT")
            .arg(1)
            .arg("BLOCK")
            .arg(wait.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(queue)
            .arg(">")
            .query_async(&mut con)
            .await?;
        let entry = read
            .into_iter()
            .flatten()
            .flat_map(|(_, entries)| entries)
            .next();
        Ok(entry.and_then(|(entry, fields)| {
            // The entry's fields are `job <id>`, as the submit script wrote them.
            let job_id = fields.get(1)?.clone();
            Some(JobClaim {
                job_id,
                entry,
                deliveries: 1,
            })
        }))
    }

    pub(super) async fn touch_job(&self, queue: &str, entry: &str, trainer: &str) -> Result<bool> {
        let held: i64 = self
            .redis
            .retried("touch_job", |mut con| {
                let mut call = TOUCH.key(queue);
                call.arg(GROUP).arg(trainer).arg(entry);
                async move { call.invoke_async(&mut con).await }
            })
            .await?;
        Ok(held == 1)
    }

    pub(super) async fn release_job(
        &self,
        queue: &str,
        claim: &JobClaim,
        trainer: &str,
    ) -> Result<bool> {
        let released: i64 = self
            .redis
            .retried("release_job", |mut con| {
                let mut call = RELEASE.key(queue);
                call.arg(GROUP)
                    .arg(trainer)
                    .arg(&claim.entry)
                    .arg(claim.deliveries);
                async move { call.invoke_async(&mut con).await }
            })
            .await?;
        Ok(released == 1)
    }

    pub(super) async fn finish_job(&self, queue: &str, entry: &str) -> Result<()> {
        let _: i64 = self
            .redis
            .retried("finish_job", |mut con| {
                let mut finish = FINISH.prepare_invoke();
                finish.key(queue).arg(GROUP).arg(entry);
                async move { finish.invoke_async(&mut con).await }
            })
            .await?;
        Ok(())
    }

    pub(super) async fn next_version(&self, key: &str) -> Result<u64> {
        Ok(self
            .redis
            .retried(
                "next_version",
                |mut con| async move { con.incr(key, 1).await },
            )
            .await?)
    }

    pub(super) async fn record_version(
        &self,
        keys: &JobKeys,
        name: &str,
        version: u64,
        body: &[u8],
    ) -> Result<bool> {
        let (names, versions) = (keys.names(), keys.versions(name));
        let recorded: i64 = self
            .redis
            .retried("record_version", |mut con| {
                let mut call = RECORD_VERSION.key(&names);
                call.key(&versions).arg(name).arg(version).arg(body);
                async move { call.invoke_async(&mut con).await }
            })
            .await?;
        Ok(recorded == 1)
    }

    pub(super) async fn versions(&self, key: &str) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut all: Vec<(u64, Vec<u8>)> = self
            .redis
            .retried(
                "model_versions",
                |mut con| async move { con.hgetall(key).await },
            )
            .await?;
        all.sort_by_key(|(v, _)| *v);
        Ok(all)
    }

    pub(super) async fn claim_name(
        &self,
        keys: &JobKeys,
        name: &str,
        owner: &str,
    ) -> Result<Option<String>> {
        let (owners, names) = (keys.owners(), keys.names());
        Ok(self
            .redis
            .retried("claim_model_name", |mut con| {
                let mut call = CLAIM_NAME.key(&owners);
                call.key(&names).arg(name).arg(owner);
                async move { call.invoke_async(&mut con).await }
            })
            .await?)
    }

    pub(super) async fn names(&self, key: &str) -> Result<Vec<String>> {
        self.sorted_members("model_names", key).await
    }

    /// The members of set `key`, sorted.
    async fn sorted_members<T: redis::FromRedisValue + Ord>(
        &self,
        op: &'static str,
        key: &str,
    ) -> Result<Vec<T>> {
        let mut members: Vec<T> = self
            .redis
            .retried(op, |mut con| async move { con.smembers(key).await })
            .await?;
        members.sort_unstable();
        Ok(members)
    }

    pub(super) async fn owner(&self, owners: &str, name: &str) -> Result<Option<String>> {
        Ok(self
            .redis
            .retried("model_owner", |mut con| async move {
                con.hget(owners, name).await
            })
            .await?)
    }

    pub(super) async fn retire(
        &self,
        keys: &JobKeys,
        name: &str,
        version: u64,
    ) -> Result<Retirement> {
        let (versions, pins) = (keys.versions(name), keys.pins(name));
        let (names, retired) = (keys.names(), keys.retired());
        let (outcome, body): (i64, Vec<u8>) = self
            .redis
            .retried("retire_model_version", |mut con| {
                let mut call = RETIRE_VERSION.key(&versions);
                call.key(&pins).key(&names).key(&retired);
                call.arg(name).arg(version);
                async move { call.invoke_async(&mut con).await }
            })
            .await?;
        Ok(match outcome {
            1 => Retirement::Retired(body),
            2 => Retirement::Pinned,
            _ => Retirement::NotFound,
        })
    }

    pub(super) async fn pin(
        &self,
        keys: &JobKeys,
        name: &str,
        version: u64,
        pinned: bool,
    ) -> Result<bool> {
        let (versions, pins) = (keys.versions(name), keys.pins(name));
        let done: i64 = self
            .redis
            .retried("pin_model_version", |mut con| {
                let mut call = PIN_VERSION.key(&versions);
                call.key(&pins).arg(version).arg(u8::from(pinned));
                async move { call.invoke_async(&mut con).await }
            })
            .await?;
        Ok(done == 1)
    }

    pub(super) async fn pins(&self, key: &str) -> Result<Vec<u64>> {
        self.sorted_members("model_pins", key).await
    }

    pub(super) async fn retired(&self, key: &str) -> Result<Vec<String>> {
        self.sorted_members("retired_model_versions", key).await
    }

    pub(super) async fn forget_retired(&self, key: &str, member: &str) -> Result<()> {
        let _: i64 = self
            .redis
            .retried("forget_retired_model_version", |mut con| async move {
                con.srem(key, member).await
            })
            .await?;
        Ok(())
    }
}
