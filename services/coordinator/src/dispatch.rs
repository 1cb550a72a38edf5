//! Dispatch of a generation's blocks to the workers, in runs: a worker keeps the session
//! in its batch from one block to the next and streams each block once committed; the
//! coordinator grants each next block as it takes the last one (so a stop it finds
//! wastes at most the block then being denoised, never committed). A run that breaks (an
//! error, a disconnect, no progress for longer than the stall wait) is moved to another
//! worker at the session's last committed block. The same seed gives the same tokens
//! wherever a block runs, so a retry is safe.
//!
//! A worker that is alive and advancing sends heartbeats while it denoises, so only one
//! that stopped advancing is timed out: after four times the recent block time, within
//! `--stall-floor-secs` and `--stall-ceiling-secs`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bd3lm_proto::v1::{
    DenoiseBlockResponse, DenoiseRunRequest, PersistKvRequest, RunControl, RunEvent, RunGrant,
    run_control, run_event,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Status, Streaming};

use crate::admission::{Admission, Admissions, Queueing, Slot};
use crate::error::Error;
use crate::metrics;
use crate::pool::{InFlight, Pool, Worker};
use crate::settings::Persistence;

/// A worker's answer for a block.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockAnswer {
    /// What the worker returned.
    pub response: DenoiseBlockResponse,
    /// The worker's public id ([`Worker::public_id`]).
    pub worker: String,
    /// Time the block waited for a slot.
    pub queued: Duration,
}

/// How blocks are tried: at most `max_attempts` faulty tries per block, a run taken for
/// stalled as `stall` says, pausing about `backoff` (doubled per fault, at most 32x,
/// jittered) in between; runs of at most `max_run_blocks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// How long a run may go without progress.
    pub stall: StallBounds,
    /// Faulty tries per block, all workers together.
    pub max_attempts: u32,
    /// The first pause between tries.
    pub backoff: Duration,
    /// Most blocks of one run.
    pub max_run_blocks: u32,
    /// Whether a new session goes to the worker that holds its prompt's first blocks
    /// (while that worker has room).
    pub prefix_routing: bool,
}

/// The bounds of the wait for a worker's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StallBounds {
    /// The shortest wait; heartbeats come four times within it.
    pub floor: Duration,
    /// The longest.
    pub ceiling: Duration,
}

/// What a generation asks of its next block (and, when it opens a run, of the run).
#[derive(Debug, Clone, Copy)]
pub struct RunAsk<'a> {
    /// The session.
    pub session: &'a str,
    /// The block wanted: the session's committed block count.
    pub block: usize,
    /// Blocks the generation may still need, this one included.
    pub blocks_left: usize,
    /// The model version of the session's last block: workers that have it loaded come
    /// first.
    pub version: Option<u64>,
    /// How committed blocks' KV blobs are written.
    pub persistence: Persistence,
    /// Token ids that end the generation (the end of sequence, single-token stops): a
    /// worker ends its run with the block holding one.
    pub stop_tokens: &'a [u32],
    /// The generation's first new token, where stop tokens are looked for from.
    pub stop_from: usize,
    /// For a new session's first block: the hashes of its first prompt's whole blocks'
    /// prefixes, which route it to a worker holding them (empty otherwise).
    pub prefix: &'a [u64],
}

/// A generation's hold on the workers: its admission slot and the run open on a worker.
/// Dropping it cancels the run (the block in progress is never committed).
#[derive(Default)]
pub struct Runs {
    slot: Option<Slot>,
    open: Option<OpenRun>,
}

/// A run open on one worker.
struct OpenRun {
    worker: Arc<Worker>,
    events: Streaming<RunEvent>,
    grants: mpsc::Sender<RunControl>,
    /// Blocks received.
    blocks: usize,
    /// The block the run ends before.
    end_block: usize,
    /// The last grant ended the run: it gives its slot up after the next block.
    yielding: bool,
    _in_flight: InFlight,
}

/// How an open run answered.
enum Read {
    Block(DenoiseBlockResponse),
    /// The worker ended the run (its bound or a stop token).
    Ended,
}

/// Sends blocks to the pool's workers, one admission slot (of the block's model) per
/// generation's run, with retries.
pub struct Dispatcher {
    pool: Arc<Pool>,
    admissions: Arc<Admissions>,
    budget: RetryBudget,
    policy: RetryPolicy,
    clock: BlockClock,
}

impl Dispatcher {
    /// Whether new sessions are routed by their prompt's first blocks.
    pub fn routes_by_prefix(&self) -> bool {
        self.policy.prefix_routing
    }

    /// A dispatcher over `pool` and its models' `admissions`, trying each block by
    /// `policy`.
    pub fn new(pool: Arc<Pool>, admissions: Arc<Admissions>, policy: RetryPolicy) -> Self {
        Self {
            pool,
            admissions,
            budget: RetryBudget::default(),
            policy,
            clock: BlockClock::default(),
        }
    }

    /// The next block `ask` names, from the run open in `runs` or a new one (after
    /// waiting for a slot as `queueing` says). A fault of the request or its stored
    /// session (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, OUT_OF_RANGE, DATA_LOSS)
    /// is returned at once, a session the worker did not find as [`Error::NoSession`]; a
    /// busy worker (RESOURCE_EXHAUSTED, when other coordinators share it) is waited for
    /// without counting as a fault; any other failure (a stall included) moves the run to
    /// another worker while the attempts and the retry budget last.
    #[tracing::instrument(skip_all, fields(block = ask.block, queue_ms))]
    pub async fn next_block(
        &self,
        runs: &mut Runs,
        ask: &RunAsk<'_>,
        queueing: &Queueing,
    ) -> Result<BlockAnswer, Error> {
        let admission = self.admissions.of(&queueing.model);
        let mut queued = Duration::ZERO;
        if runs.slot.is_none() {
            let started = Instant::now();
            runs.slot = Some(
                admission
                    .acquire(queueing, self.policy.stall.ceiling)
                    .await?,
            );
            queued = started.elapsed();
            metrics::queue_wait(queued);
            tracing::Span::current().record("queue_ms", queued.as_secs_f64() * 1e3);
        }
        let mut tried: Vec<String> = Vec::new();
        let mut faults = 0;
        loop {
            let status = match self
                .read(runs, ask, (&queueing.model, &admission), &tried)
                .await
            {
                Ok((response, worker)) => {
                    self.pool.remember(ask.session, &worker.addr);
                    self.pool
                        .remember_prefix(&queueing.model, ask.prefix, &worker.addr);
                    self.budget.deposit();
                    return Ok(BlockAnswer {
                        response,
                        worker: worker.public_id(),
                        queued,
                    });
                }
                Err((status, _)) if is_request_fault(status.code()) => {
                    return Err(request_fault(ask.session, status));
                }
                Err((status, worker)) => {
                    if let Some(worker) = worker {
                        tracing::warn!(worker = %worker.addr, code = ?status.code(), "run failed; retrying");
                        tried.push(worker.addr.clone());
                    }
                    status
                }
            };
            if status.code() != Code::ResourceExhausted {
                faults += 1;
                if faults >= self.policy.max_attempts || !self.budget.withdraw() {
                    return Err(Error::Worker(status));
                }
            }
            metrics::retry(status.code());
            tokio::time::sleep(jittered(self.policy.backoff * (1u32 << faults.min(5)))).await;
            // Once every worker has been tried, they all get another chance.
            if self
                .pool
                .pick(
                    ask.session,
                    &tried,
                    (&queueing.model, ask.version),
                    ask.prefix,
                )
                .is_none()
            {
                tried.clear();
            }
        }
    }

    /// One try at the block: from the open run, else from a run opened on a worker of
    /// `model` not in `tried`. A run that breaks is dropped (the worker stops it); one
    /// that ended at its bound is followed by the next.
    async fn read(
        &self,
        runs: &mut Runs,
        ask: &RunAsk<'_>,
        (model, admission): (&str, &Admission),
        tried: &[String],
    ) -> Result<(DenoiseBlockResponse, Arc<Worker>), (Status, Option<Arc<Worker>>)> {
        loop {
            let mut open = match runs.open.take() {
                Some(open) => open,
                None => self.open(ask, model, tried).await?,
            };
            let worker = open.worker.clone();
            // A run that gave blocks is asked for the next by a grant; when others wait
            // for a slot, that block is its last.
            let last = open.blocks > 0 && admission.waiting() > 0;
            // A worker that closed its side has ended the run: its stream says how.
            open.grant(ask.block, last).await;
            match self.wait(&mut open).await {
                Ok(Read::Block(response)) => {
                    open.blocks += 1;
                    if open.yielding {
                        runs.slot = None;
                    } else if (response.committed_blocks as usize) < open.end_block {
                        runs.open = Some(open);
                    }
                    return Ok((response, worker));
                }
                Ok(Read::Ended) if open.blocks > 0 => continue,
                Ok(Read::Ended) => {
                    let status = Status::internal("a denoise worker ended a run without a block");
                    return Err((status, Some(worker)));
                }
                Err(status) => return Err((status, Some(worker))),
            }
        }
    }

    /// Opens a run of `ask` on a worker of `model` (by routing, not in `tried`).
    async fn open(
        &self,
        ask: &RunAsk<'_>,
        model: &str,
        tried: &[String],
    ) -> Result<OpenRun, (Status, Option<Arc<Worker>>)> {
        let picked = self
            .pool
            .pick(ask.session, tried, (model, ask.version), ask.prefix);
        let Some(worker) = picked else {
            return Err((Status::unavailable("no healthy denoise worker"), None));
        };
        let stall = self.clock.stall_after(self.policy.stall);
        let end_block = ask.block + ask.blocks_left.clamp(1, self.run_bound());
        let start = DenoiseRunRequest {
            session_id: ask.session.to_string(),
            first_block: ask.block as u32,
            end_block: end_block as u32,
            kv_persistence: ask.persistence.to_wire() as i32,
            stop_token_ids: ask.stop_tokens.to_vec(),
            stop_from: ask.stop_from as u32,
            heartbeat_ms: heartbeat(self.policy.stall).as_millis() as u32,
        };
        let (grants, controls) = mpsc::channel(4);
        let start = RunControl {
            control: Some(run_control::Control::Start(start)),
        };
        grants.try_send(start).expect("room for the start");
        let mut request = Request::new(ReceiverStream::new(controls));
        bd3lm_telemetry::inject(request.metadata_mut());
        let in_flight = worker.enter();
        let mut client = worker.client();
        let opened = match tokio::time::timeout(stall, client.denoise_run(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(from_worker(status, &self.pool, &worker)),
            Err(_) => Err(stalled(&worker, stall)),
        };
        match opened {
            Ok(events) => Ok(OpenRun {
                worker,
                events,
                grants,
                blocks: 0,
                end_block,
                yielding: false,
                _in_flight: in_flight,
            }),
            Err(status) => Err((status, Some(worker))),
        }
    }

    /// Most blocks of a run: one each when routing rotates every block.
    fn run_bound(&self) -> usize {
        match self.pool.rotates() {
            true => 1,
            false => self.policy.max_run_blocks as usize,
        }
    }

    /// The open run's next block, or its end; any message is progress, and none for the
    /// stall wait is a stall.
    async fn wait(&self, open: &mut OpenRun) -> Result<Read, Status> {
        let started = Instant::now();
        loop {
            let stall = self.clock.stall_after(self.policy.stall);
            let event = match tokio::time::timeout(stall, open.events.message()).await {
                Ok(Ok(Some(event))) => event.event,
                Ok(Ok(None)) => return Ok(Read::Ended),
                Ok(Err(status)) => return Err(from_worker(status, &self.pool, &open.worker)),
                Err(_) => return Err(stalled(&open.worker, stall)),
            };
            match event {
                Some(run_event::Event::Block(response)) => {
                    self.clock.observe(started.elapsed());
                    return Ok(Read::Block(response));
                }
                Some(run_event::Event::Progress(_)) => metrics::heartbeat(),
                None => {}
            }
        }
    }

    /// Asks the worker that served `session`'s last block to write the KV blobs of its
    /// window at `committed` blocks (a generation's end under [`Persistence::AtEnd`]),
    /// once the generation's runs are over.
    /// Best effort: a worker that is gone, no longer holds the session or fails writes
    /// nothing, and the session's next worker rebuilds from its tokens. Blocks written.
    pub async fn persist_kv(&self, session: &str, committed: usize) -> u32 {
        let Some(worker) = self.pool.holder(session) else {
            metrics::kv_persisted("no_worker");
            return 0;
        };
        let mut request = Request::new(PersistKvRequest {
            session_id: session.to_string(),
            committed_blocks: committed as u32,
        });
        bd3lm_telemetry::inject(request.metadata_mut());
        let mut client = worker.client();
        let call = client.persist_kv(request);
        let wait = self.clock.stall_after(self.policy.stall);
        match tokio::time::timeout(wait, call).await {
            Ok(Ok(answer)) => {
                let written = answer.into_inner().blocks_written;
                metrics::kv_persisted(if written > 0 { "written" } else { "not_held" });
                written
            }
            Ok(Err(status)) => {
                tracing::warn!(worker = %worker.addr, code = ?status.code(), "persisting the KV window failed");
                metrics::kv_persisted("failed");
                0
            }
            Err(_) => {
                tracing::warn!(worker = %worker.addr, "persisting the KV window timed out");
                metrics::kv_persisted("failed");
                0
            }
        }
    }
}

impl OpenRun {
    /// Lets the worker commit `block` (a fresh run's first is granted by its start);
    /// `last` ends the run with it.
    async fn grant(&mut self, block: usize, last: bool) {
        if self.blocks == 0 {
            return;
        }
        let grant = RunGrant {
            commit_below: block as u32 + 1,
            last,
        };
        let control = RunControl {
            control: Some(run_control::Control::Grant(grant)),
        };
        self.yielding = last;
        let _ = self.grants.send(control).await;
    }
}

/// A run without progress for `waited`: the worker is taken for stalled.
fn stalled(worker: &Worker, waited: Duration) -> Status {
    tracing::warn!(worker = %worker.addr, ?waited, "no progress from a denoise worker; moving the run");
    metrics::stall();
    Status::deadline_exceeded(format!(
        "no progress from a denoise worker within {waited:?}"
    ))
}

/// The interval at which workers send progress: four times per stall floor.
fn heartbeat(bounds: StallBounds) -> Duration {
    (bounds.floor / 4).clamp(Duration::from_millis(50), Duration::from_secs(10))
}

/// The recent time of a block from the workers (a moving average), from which the stall
/// wait is derived.
#[derive(Default)]
struct BlockClock {
    average: Mutex<Option<Duration>>,
}

impl BlockClock {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Duration>> {
        self.average.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn observe(&self, took: Duration) {
        let mut average = self.lock();
        *average = Some(match *average {
            Some(a) => a.mul_f64(0.9) + took.mul_f64(0.1),
            None => took,
        });
    }

    /// Four times the recent block time, within `bounds`.
    fn stall_after(&self, bounds: StallBounds) -> Duration {
        let recent = self.lock().unwrap_or_default();
        (recent * 4).clamp(bounds.floor, bounds.ceiling)
    }
}

/// A worker's failure as the client may see it. The worker's own statuses name only the
/// request's fields; a transport failure (which may name hosts) is logged here and
/// becomes a plain UNAVAILABLE (and marks the worker down), and a refused internal
/// credential is this deployment's fault, not the caller's: INTERNAL.
fn from_worker(status: Status, pool: &Pool, worker: &Worker) -> Status {
    if is_transport_failure(&status) {
        pool.mark_down(worker);
        tracing::warn!(worker = %worker.addr, error = %status, "a denoise worker could not be reached");
        return Status::unavailable("a denoise worker could not be reached");
    }
    if status.code() == Code::Unauthenticated {
        tracing::error!(worker = %worker.addr, "a worker refused the internal token (--internal-token-file)");
        return Status::internal("a denoise worker refused this coordinator");
    }
    status
}

/// `pause` scaled by a random factor in [0.5, 1.5), so that retries of many blocks do not
/// arrive together.
fn jittered(pause: Duration) -> Duration {
    pause.mul_f64(rand::random_range(0.5..1.5))
}

/// Retries allowed across all blocks: each success earns a fifth of a retry (up to 100
/// saved), each retry spends one, so that retries stay a small share of the traffic when
/// workers fail together instead of multiplying it.
struct RetryBudget {
    balance: Mutex<f64>,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            balance: Mutex::new(20.0),
        }
    }
}

impl RetryBudget {
    fn lock(&self) -> std::sync::MutexGuard<'_, f64> {
        self.balance.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn deposit(&self) {
        let mut b = self.lock();
        *b = (*b + 0.2).min(100.0);
    }

    fn withdraw(&self) -> bool {
        let mut b = self.lock();
        if *b >= 1.0 {
            *b -= 1.0;
            true
        } else {
            tracing::warn!("retry budget spent; failing the block");
            false
        }
    }
}

/// Faults of the request itself: no other worker would answer differently.
fn is_request_fault(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::DataLoss
    )
}

/// A request fault as the coordinator decides on it: a session the worker did not find
/// is [`Error::NoSession`] (the stream restores it); the others are the worker's answer.
fn request_fault(session: &str, status: Status) -> Error {
    match status.code() {
        Code::NotFound => Error::NoSession(session.to_string()),
        _ => Error::Worker(status),
    }
}

/// True when the call failed in the connection (refused, reset, closed), not in the
/// worker: tonic attaches the transport or I/O error as the status's source.
pub(crate) fn is_transport_failure(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::transport::Error>() || e.is::<std::io::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use bd3lm_proto::v1::DenoiseBlockRequest;
    use bd3lm_proto::v1::denoise_worker_client::DenoiseWorkerClient;

    /// A refused connection is a transport failure; a status a server sent is not.
    #[tokio::test]
    async fn transport_failures_are_told_apart_by_type() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect_lazy();
        let status = DenoiseWorkerClient::new(channel)
            .denoise_block(DenoiseBlockRequest::default())
            .await
            .unwrap_err();
        assert!(is_transport_failure(&status), "{status:?}");
        assert!(!is_transport_failure(&Status::unavailable("transport")));
        assert!(!is_transport_failure(&Status::resource_exhausted("full")));
    }
}
