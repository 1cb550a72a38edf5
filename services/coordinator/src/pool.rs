//! The denoise workers: addresses from a static list or a DNS name, periodic health
//! checks, load, and session affinity.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bd3lm_proto::auth::Bearer;
use bd3lm_proto::v1::denoise_worker_client::DenoiseWorkerClient;
use bd3lm_proto::v1::{InfoRequest, InfoResponse, ServedModel};
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::metrics;
use crate::settings::Routing;

/// Where worker addresses come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerSource {
    /// A fixed list of `host:port`.
    Static(Vec<String>),
    /// DNS names (e.g. Kubernetes headless services, one per worker pool) with their
    /// ports; every address they resolve to is a worker.
    Dns(Vec<String>),
}

/// A worker's client: every call carries the internal credential.
pub type WorkerClient = DenoiseWorkerClient<InterceptedService<Channel, Bearer>>;

/// One denoise worker.
pub struct Worker {
    /// Its `host:port`.
    pub addr: String,
    client: WorkerClient,
    health: HealthClient<Channel>,
    healthy: AtomicBool,
    /// Health checks in a row without an answer.
    failures: AtomicU32,
    in_flight: AtomicUsize,
    /// Blocks it takes at once, from its Info.
    capacity: AtomicUsize,
    /// Its `Info.worker_id`, once read.
    id: Mutex<String>,
    /// The model versions it has loaded, the latest last, from its Info.
    versions: Mutex<Vec<u64>>,
    /// What it serves, from its Info: the model's id, block size and context length.
    model: Mutex<Option<(String, u32, u32)>>,
}

impl Worker {
    fn new(addr: &str, bearer: Bearer, tls: Option<&ClientTlsConfig>) -> anyhow::Result<Self> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        let channel = endpoint.connect_lazy();
        Ok(Self {
            addr: addr.to_string(),
            client: DenoiseWorkerClient::with_interceptor(channel.clone(), bearer)
                .max_decoding_message_size(64 << 20),
            health: HealthClient::new(channel),
            healthy: AtomicBool::new(false),
            failures: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
            capacity: AtomicUsize::new(1),
            id: Mutex::default(),
            versions: Mutex::default(),
            model: Mutex::default(),
        })
    }

    /// A client for one call, with the internal credential.
    pub fn client(&self) -> WorkerClient {
        self.client.clone()
    }

    /// Counts a call in flight for as long as the guard lives.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Checks the worker's health (and reads its capacity): see [`judge`].
    async fn check(&self, down_after: u32) -> bool {
        let request = HealthCheckRequest {
            service: String::new(),
        };
        let answer =
            tokio::time::timeout(Duration::from_secs(2), self.health.clone().check(request)).await;
        let serving = match answer {
            Ok(Ok(r)) => Some(r.get_ref().status == ServingStatus::Serving as i32),
            _ => None,
        };
        let was = self.healthy.load(Ordering::Relaxed);
        let ok = judge(was, serving, &self.failures, down_after);
        if serving == Some(true) {
            let mut client = self.client();
            let info = tokio::time::timeout(Duration::from_secs(2), client.info(InfoRequest {}));
            if let Ok(Ok(info)) = info.await {
                let info = info.into_inner();
                self.capacity
                    .store(info.capacity.max(1) as usize, Ordering::Relaxed);
                *self.id.lock().unwrap_or_else(|e| e.into_inner()) = info.worker_id;
                let model = (info.model_id, info.block_size, info.model_length);
                *self.model.lock().unwrap_or_else(|e| e.into_inner()) = Some(model);
                let mut versions = info.loaded_versions;
                versions.sort_unstable();
                *self.versions() = versions;
            }
        }
        self.healthy.store(ok, Ordering::Relaxed);
        ok
    }

    /// What clients are told of this worker: its own id, never its address.
    pub fn public_id(&self) -> String {
        self.id.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn versions(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.versions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The latest model version it serves (`None` for a checkpoint directory's model).
    fn latest_version(&self) -> Option<u64> {
        self.versions().last().copied()
    }

    /// Whether its Info said it serves `model`.
    fn serves(&self, model: &str) -> bool {
        let served = self.model.lock().unwrap_or_else(|e| e.into_inner());
        served.as_ref().is_some_and(|(id, ..)| id == model)
    }

    fn has_room(&self) -> bool {
        self.in_flight() < self.capacity.load(Ordering::Relaxed)
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Blocks in flight beyond the least loaded worker's (`least`) this worker may have
    /// and still win a new session whose prompt blocks it holds: a quarter of its
    /// capacity, at least one. Beyond it, computing (or reading from the store) the
    /// prompt's blocks elsewhere costs less than the queue behind this worker's batch.
    fn prefix_slack(&self) -> usize {
        (self.capacity.load(Ordering::Relaxed) / 4).max(1)
    }
}

/// The key of a prompt prefix of `model` in the routing map.
fn prefix_key(model: &str, hash: u64) -> String {
    format!("{model}:{hash:016x}")
}

/// The workers of `workers` that serve `version`, or, for a new session (`None`), the
/// newest version any of them serves; all of them when none does.
fn serving(workers: Vec<Arc<Worker>>, version: Option<u64>) -> Vec<Arc<Worker>> {
    let wanted = version.or_else(|| workers.iter().filter_map(|w| w.latest_version()).max());
    let Some(wanted) = wanted else {
        return workers;
    };
    let has = |w: &Arc<Worker>| match version {
        Some(v) => w.versions().contains(&v),
        None => w.latest_version() == Some(wanted),
    };
    if workers.iter().any(has) {
        workers.into_iter().filter(has).collect()
    } else {
        workers
    }
}

/// Every address `names` resolve to; the first name that does not resolve in time, and
/// why, otherwise.
async fn resolve(names: &[String]) -> Result<Vec<String>, (String, String)> {
    let mut found = Vec::new();
    for name in names {
        let lookup = tokio::net::lookup_host(name.as_str());
        match tokio::time::timeout(DNS_TIMEOUT, lookup).await {
            Ok(Ok(addrs)) => found.extend(addrs.map(|a| a.to_string())),
            Ok(Err(e)) => return Err((name.clone(), e.to_string())),
            Err(_) => return Err((name.clone(), "timed out".into())),
        }
    }
    Ok(found)
}

/// Whether a worker is healthy after a check: an answer decides (SERVING or not: a worker
/// loading or draining says so); no answer is a failure, and only `down_after` failures in
/// a row mark a healthy worker down, so one slow check under load does not.
fn judge(was_healthy: bool, serving: Option<bool>, failures: &AtomicU32, down_after: u32) -> bool {
    match serving {
        Some(serving) => {
            failures.store(0, Ordering::Relaxed);
            serving
        }
        None => {
            let failed = failures.fetch_add(1, Ordering::Relaxed) + 1;
            was_healthy && failed < down_after
        }
    }
}

/// A call in flight on a worker.
pub struct InFlight(Arc<Worker>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The worker of each session's last block, for at most `capacity` sessions: the least
/// recently used are forgotten first, so the map stays bounded however many sessions
/// come and go without a DeleteSession.
struct Affinity {
    capacity: usize,
    clock: u64,
    /// Session -> (worker address, last use).
    entries: HashMap<String, (String, u64)>,
}

impl Affinity {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            clock: 0,
            entries: HashMap::new(),
        }
    }

    fn get(&mut self, session: &str) -> Option<String> {
        self.clock += 1;
        let now = self.clock;
        self.entries.get_mut(session).map(|(addr, used)| {
            *used = now;
            addr.clone()
        })
    }

    fn insert(&mut self, session: &str, addr: &str) {
        self.clock += 1;
        let entry = (addr.to_string(), self.clock);
        if self.entries.insert(session.to_string(), entry).is_none()
            && self.entries.len() > self.capacity
        {
            // Beyond the bound, forget the older half at once: one O(n) pass per n/2
            // new sessions.
            let mut ages: Vec<u64> = self.entries.values().map(|(_, used)| *used).collect();
            let (_, cut, _) = ages.select_nth_unstable(self.entries.len() / 2);
            let cut = *cut;
            self.entries.retain(|_, (_, used)| *used >= cut);
        }
    }
}

/// The set of workers.
pub struct Pool {
    workers: RwLock<Vec<Arc<Worker>>>,
    affinity: Mutex<Affinity>,
    /// The worker that last began a session with a prompt prefix, by model and the
    /// hash of the prefix's tokens (each whole block's end), bounded as the affinity.
    prefixes: Mutex<Affinity>,
    routing: Routing,
    down_after: u32,
    bearer: Bearer,
    tls: Option<ClientTlsConfig>,
    /// What the healthy workers offer, published whenever it changes.
    serving: watch::Sender<Serving>,
}

/// What the healthy workers offer together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Serving {
    /// Healthy workers.
    pub workers: usize,
    /// Blocks they take at once.
    pub capacity: usize,
    /// Blocks they take at once, by the model they serve.
    pub by_model: std::collections::BTreeMap<String, usize>,
}

/// How long resolving `--workers-dns` may take before the known workers are kept.
const DNS_TIMEOUT: Duration = Duration::from_secs(2);

impl Pool {
    /// An empty pool remembering the workers of at most `affinity_sessions` sessions;
    /// [`Pool::refresh`] fills it; a worker is marked down after `down_after` health checks
    /// in a row without an answer.
    pub fn new(routing: Routing, affinity_sessions: usize, down_after: u32) -> Self {
        Self {
            down_after: down_after.max(1),
            workers: RwLock::default(),
            affinity: Mutex::new(Affinity::new(affinity_sessions)),
            prefixes: Mutex::new(Affinity::new(affinity_sessions)),
            routing,
            bearer: Bearer::default(),
            tls: None,
            serving: watch::channel(Serving::default()).0,
        }
    }

    /// What the healthy workers offer, changed as health checks and failed calls change
    /// it: admission and readiness follow it instead of polling.
    pub fn watch(&self) -> watch::Receiver<Serving> {
        self.serving.subscribe()
    }

    /// Marks `worker` down until its next successful health check.
    pub fn mark_down(&self, worker: &Worker) {
        worker.healthy.store(false, Ordering::Relaxed);
        self.publish();
    }

    /// Publishes what the healthy workers offer now, if it changed.
    fn publish(&self) {
        let by_model = self
            .served()
            .into_iter()
            .map(|m| (m.id, m.capacity as usize))
            .collect();
        let now = Serving {
            workers: self.healthy_count(),
            capacity: self.capacity(),
            by_model,
        };
        self.serving.send_if_modified(|s| {
            let changed = *s != now;
            *s = now;
            changed
        });
    }

    /// The pool whose connections to workers use `tls` (plain text when `None`).
    pub fn with_tls(mut self, tls: Option<ClientTlsConfig>) -> Self {
        self.tls = tls;
        self
    }

    /// The pool whose calls to workers carry `bearer` (the workers' internal token).
    pub fn with_bearer(mut self, bearer: Bearer) -> Self {
        self.bearer = bearer;
        self
    }

    fn affinity(&self) -> std::sync::MutexGuard<'_, Affinity> {
        self.affinity.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn workers(&self) -> Vec<Arc<Worker>> {
        self.workers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Resolves `source`, keeps known workers, adds new ones, drops vanished ones, and
    /// checks every worker's health. Returns the number of healthy workers.
    pub async fn refresh(&self, source: &WorkerSource) -> usize {
        let addrs = match source {
            WorkerSource::Static(list) => list.clone(),
            WorkerSource::Dns(names) => match resolve(names).await {
                Ok(found) => found,
                Err((name, error)) => {
                    tracing::warn!(%name, %error, "resolving workers failed; keeping the known ones");
                    self.workers().iter().map(|w| w.addr.clone()).collect()
                }
            },
        };
        let current = self.workers();
        let mut next = Vec::with_capacity(addrs.len());
        for addr in addrs {
            match current.iter().find(|w| w.addr == addr) {
                Some(w) => next.push(w.clone()),
                None => match Worker::new(&addr, self.bearer.clone(), self.tls.as_ref()) {
                    Ok(w) => next.push(Arc::new(w)),
                    Err(e) => tracing::warn!(%addr, error = %e, "bad worker address"),
                },
            }
        }
        *self.workers.write().unwrap_or_else(|e| e.into_inner()) = next.clone();
        let checks = next.iter().map(|w| w.check(self.down_after));
        let healthy = futures::future::join_all(checks)
            .await
            .into_iter()
            .filter(|&ok| ok)
            .count();
        self.publish();
        healthy
    }

    /// The worker for the next block of `session` of `model`, skipping `exclude`d
    /// addresses. Only workers serving the session's model `version` are candidates when
    /// any is (a new session: those serving the newest version), so sessions stay on
    /// their version during a rollout. A new session whose first prompt's whole blocks
    /// have `prefix` hashes goes to the worker that began a session with its longest
    /// prefix (its blocks' keys and values are in that worker's prefix cache) while that
    /// worker has room and is not much busier than the least loaded (`prefix_slack`);
    /// else, as any other, to the least loaded.
    pub fn pick(
        &self,
        session: &str,
        exclude: &[String],
        (model, version): (&str, Option<u64>),
        prefix: &[u64],
    ) -> Option<Arc<Worker>> {
        let healthy: Vec<Arc<Worker>> = self
            .workers()
            .into_iter()
            .filter(|w| w.healthy.load(Ordering::Relaxed) && !exclude.contains(&w.addr))
            .filter(|w| w.serves(model))
            .collect();
        let healthy = serving(healthy, version);
        let last = self.affinity().get(session);
        // The fewest blocks in flight per unit of capacity.
        let least_loaded = |ws: &[Arc<Worker>]| {
            ws.iter()
                .min_by_key(|w| {
                    let load = w.in_flight.load(Ordering::Relaxed) * 1024;
                    load / w.capacity.load(Ordering::Relaxed).max(1)
                })
                .cloned()
        };
        match (self.routing, last) {
            (Routing::Affinity, Some(last)) => healthy
                .iter()
                .find(|w| w.addr == last && w.has_room())
                .cloned()
                .or_else(|| least_loaded(&healthy)),
            (Routing::Rotate, Some(last)) => {
                let others: Vec<Arc<Worker>> =
                    healthy.iter().filter(|w| w.addr != last).cloned().collect();
                least_loaded(&others).or_else(|| least_loaded(&healthy))
            }
            (Routing::Affinity, None) => self
                .prefix_holder(model, prefix, &healthy)
                .or_else(|| least_loaded(&healthy)),
            (Routing::Rotate, None) => least_loaded(&healthy),
        }
    }

    /// Of `healthy`, the worker that began a session with the longest of `prefix` (of
    /// `model`), when it has room and at most its slack more blocks in flight than the
    /// least loaded.
    fn prefix_holder(
        &self,
        model: &str,
        prefix: &[u64],
        healthy: &[Arc<Worker>],
    ) -> Option<Arc<Worker>> {
        if prefix.is_empty() {
            return None;
        }
        let mut prefixes = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
        let holder = prefix
            .iter()
            .rev()
            .find_map(|hash| prefixes.get(&prefix_key(model, *hash)))?;
        let worker = healthy.iter().find(|w| w.addr == holder);
        let least = healthy.iter().map(|w| w.in_flight()).min().unwrap_or(0);
        let balanced = |w: &&Arc<Worker>| w.in_flight() <= least + w.prefix_slack();
        let chosen = worker.filter(|w| w.has_room()).filter(balanced).cloned();
        metrics::prefix_route(match (worker, &chosen) {
            (_, Some(_)) => "held",
            (Some(_), None) => "busy",
            (None, _) => "gone",
        });
        chosen
    }

    /// Records that `addr` began a session of `model` whose first prompt's whole blocks
    /// have `prefix` hashes.
    pub fn remember_prefix(&self, model: &str, prefix: &[u64], addr: &str) {
        let mut prefixes = self.prefixes.lock().unwrap_or_else(|e| e.into_inner());
        for hash in prefix {
            prefixes.insert(&prefix_key(model, *hash), addr);
        }
    }

    /// The worker that served `session`'s last block, when it is remembered and healthy.
    pub fn holder(&self, session: &str) -> Option<Arc<Worker>> {
        let last = self.affinity().get(session)?;
        self.workers()
            .into_iter()
            .find(|w| w.addr == last && w.healthy.load(Ordering::Relaxed))
    }

    /// Whether every block moves to another worker ([`Routing::Rotate`]): then each is
    /// a run of its own.
    pub fn rotates(&self) -> bool {
        self.routing == Routing::Rotate
    }

    /// Records the worker that served `session`'s last block.
    pub fn remember(&self, session: &str, addr: &str) {
        self.affinity().insert(session, addr);
    }

    /// Forgets a session's worker.
    pub fn forget(&self, session: &str) {
        self.affinity().entries.remove(session);
    }

    /// Sessions whose worker is remembered.
    pub fn remembered(&self) -> usize {
        self.affinity().entries.len()
    }

    /// The model information of a healthy worker serving `model`.
    pub async fn model_info(&self, model: &str) -> Option<InfoResponse> {
        for w in self
            .workers()
            .into_iter()
            .filter(|w| w.healthy.load(Ordering::Relaxed) && w.serves(model))
        {
            if let Ok(Ok(info)) =
                tokio::time::timeout(Duration::from_secs(2), w.client().info(InfoRequest {})).await
            {
                return Some(info.into_inner());
            }
        }
        None
    }

    /// The models the healthy workers serve, sorted by id: each with its loaded
    /// versions, the newest, its workers and their capacity.
    pub fn served(&self) -> Vec<ServedModel> {
        let mut models: std::collections::BTreeMap<String, ServedModel> = Default::default();
        for w in self.workers() {
            let Some((id, block_size, model_length)) =
                w.model.lock().unwrap_or_else(|e| e.into_inner()).clone()
            else {
                continue;
            };
            let model = models.entry(id.clone()).or_insert_with(|| ServedModel {
                id,
                block_size,
                model_length,
                ..Default::default()
            });
            if !w.healthy.load(Ordering::Relaxed) {
                continue;
            }
            model.ready_workers += 1;
            model.capacity += w.capacity.load(Ordering::Relaxed) as u32;
            let versions = w.versions().clone();
            model.latest_version = model.latest_version.max(versions.last().copied());
            model.versions.extend(versions);
        }
        models
            .into_values()
            .map(|mut m| {
                m.versions.sort_unstable();
                m.versions.dedup();
                m
            })
            .collect()
    }

    /// Blocks the healthy workers take at once, all together.
    pub fn capacity(&self) -> usize {
        self.workers()
            .iter()
            .filter(|w| w.healthy.load(Ordering::Relaxed))
            .map(|w| w.capacity.load(Ordering::Relaxed))
            .sum()
    }

    /// Number of healthy workers.
    pub fn healthy_count(&self) -> usize {
        self.workers()
            .iter()
            .filter(|w| w.healthy.load(Ordering::Relaxed))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer decides at once; silence marks a healthy worker down only after
    /// `down_after` checks in a row, and a worker never seen healthy stays down.
    /// Several names resolve together (one per worker pool); a name that does not
    /// resolve is reported, so the known workers are kept.
    #[tokio::test]
    async fn every_pools_name_is_resolved() {
        let names = ["127.0.0.1:50061".to_string(), "127.0.0.2:50061".to_string()];
        let found = resolve(&names).await.unwrap();
        assert_eq!(found, vec!["127.0.0.1:50061", "127.0.0.2:50061"]);
        let bad = [names[0].clone(), "no-port-given".to_string()];
        let (name, _) = resolve(&bad).await.unwrap_err();
        assert_eq!(name, "no-port-given");
    }

    #[test]
    fn workers_go_down_after_consecutive_silent_checks() {
        let failures = AtomicU32::new(0);
        assert!(judge(false, Some(true), &failures, 3));
        assert!(judge(true, None, &failures, 3));
        assert!(judge(true, None, &failures, 3));
        assert!(!judge(true, None, &failures, 3), "third silent check");
        assert!(judge(false, Some(true), &failures, 3), "an answer resets");
        assert!(judge(true, None, &failures, 3));
        assert!(
            !judge(true, Some(false), &failures, 3),
            "draining: down at once"
        );
        assert!(!judge(false, None, &failures, 1));
        let fresh = AtomicU32::new(0);
        assert!(!judge(false, None, &fresh, 3), "never healthy stays down");
    }

    /// During a rollout a session's blocks go to the workers that still serve its
    /// version, new sessions to those serving the newest; any worker when none does.
    #[tokio::test]
    async fn blocks_go_to_workers_serving_the_session_version() {
        let worker = |addr: &str, versions: &[u64]| {
            let w = Worker::new(addr, Bearer::default(), None).unwrap();
            *w.versions() = versions.to_vec();
            Arc::new(w)
        };
        let workers = vec![
            worker("old", &[1]),
            worker("both", &[1, 2]),
            worker("new", &[2]),
        ];
        let addrs = |ws: Vec<Arc<Worker>>| ws.iter().map(|w| w.addr.clone()).collect::<Vec<_>>();
        assert_eq!(addrs(serving(workers.clone(), Some(1))), ["old", "both"]);
        assert_eq!(addrs(serving(workers.clone(), Some(2))), ["both", "new"]);
        assert_eq!(addrs(serving(workers.clone(), None)), ["both", "new"]);
        assert_eq!(
            addrs(serving(workers.clone(), Some(9))).len(),
            3,
            "moved on anywhere"
        );
        let plain = vec![worker("a", &[]), worker("b", &[])];
        assert_eq!(
            addrs(serving(plain, None)),
            ["a", "b"],
            "checkpoint workers"
        );
    }

    /// However many sessions pass, the map holds at most its capacity, and the sessions
    /// used recently are the ones kept.
    #[test]
    fn affinity_is_bounded_and_keeps_the_recent_sessions() {
        let pool = Pool::new(Routing::Affinity, 100, 3);
        pool.remember("hot", "w1");
        for i in 0..10_000 {
            pool.remember(&format!("s{i}"), "w2");
            if i % 10 == 0 {
                assert_eq!(pool.affinity().get("hot").as_deref(), Some("w1"));
            }
        }
        assert!(pool.remembered() <= 100, "{}", pool.remembered());
        assert_eq!(pool.affinity().get("s9999").as_deref(), Some("w2"));
        assert_eq!(pool.affinity().get("s0"), None);
        pool.forget("hot");
        assert_eq!(pool.affinity().get("hot"), None);
    }
}
