//! Dispatch of one block to the workers: the worker holding the session first, another
//! on an error, a timeout or a disconnect, until one answers or the attempts run out.
//! The same seed gives the same tokens wherever the block runs, so a retry is safe.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bd3lm_proto::v1::{DenoiseBlockRequest, DenoiseBlockResponse, PersistKvRequest};
use tonic::{Code, Request, Status};

use crate::admission::{Admissions, Queueing};
use crate::error::Error;
use crate::metrics;
use crate::pool::{Pool, Worker};
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

/// How a block is tried: at most `max_attempts` faulty tries, each waiting up to
/// `timeout`, pausing about `backoff` (doubled per fault, at most 32x, jittered) in
/// between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The longest wait for one worker's answer.
    pub timeout: Duration,
    /// Faulty tries per block, all workers together.
    pub max_attempts: u32,
    /// The first pause between tries.
    pub backoff: Duration,
}

/// Sends blocks to the pool's workers, one admission slot (of the block's model) per
/// block, with retries.
pub struct Dispatcher {
    pool: Arc<Pool>,
    admissions: Arc<Admissions>,
    budget: RetryBudget,
    policy: RetryPolicy,
}

impl Dispatcher {
    /// A dispatcher over `pool` and its models' `admissions`, trying each block by
    /// `policy`.
    pub fn new(pool: Arc<Pool>, admissions: Arc<Admissions>, policy: RetryPolicy) -> Self {
        Self {
            pool,
            admissions,
            budget: RetryBudget::default(),
            policy,
        }
    }

    /// Waits for a slot as `queueing` says, then asks workers for block `block` of `session` (whose last
    /// block ran on model `version`: workers that have it loaded come first; its KV blob
    /// written as `persistence` says) until one answers. A fault of the request or its
    /// stored session (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, OUT_OF_RANGE,
    /// DATA_LOSS) is returned at once, a session the worker did not find as
    /// [`Error::NoSession`]; a busy worker
    /// (RESOURCE_EXHAUSTED, when other coordinators share it) is waited for without
    /// counting as a fault; any other failure is tried again elsewhere while the attempts
    /// and the retry budget last.
    #[tracing::instrument(skip(self, queueing), fields(queue_ms))]
    pub async fn denoise_block(
        &self,
        session: &str,
        block: usize,
        version: Option<u64>,
        persistence: Persistence,
        queueing: &Queueing,
    ) -> Result<BlockAnswer, Error> {
        let started = Instant::now();
        let admission = self.admissions.of(&queueing.model);
        let _slot = admission.acquire(queueing, self.policy.timeout).await?;
        let queued = started.elapsed();
        metrics::queue_wait(queued);
        tracing::Span::current().record("queue_ms", queued.as_secs_f64() * 1e3);
        let mut tried: Vec<String> = Vec::new();
        let mut faults = 0;
        loop {
            // Once every worker has been tried, they all get another chance.
            let model = (queueing.model.as_str(), version);
            let worker = self.pool.pick(session, &tried, model).or_else(|| {
                tried.clear();
                self.pool.pick(session, &tried, model)
            });
            let status = match worker {
                None => Status::unavailable("no healthy denoise worker"),
                Some(worker) => match self.attempt(&worker, session, block, persistence).await {
                    Ok(response) => {
                        self.pool.remember(session, &worker.addr);
                        self.budget.deposit();
                        let worker = worker.public_id();
                        return Ok(BlockAnswer {
                            response,
                            worker,
                            queued,
                        });
                    }
                    Err(status) if is_request_fault(status.code()) => {
                        return Err(request_fault(session, status));
                    }
                    Err(status) => {
                        tried.push(worker.addr.clone());
                        tracing::warn!(worker = %worker.addr, code = ?status.code(), "block failed; retrying");
                        status
                    }
                },
            };
            if status.code() != Code::ResourceExhausted {
                faults += 1;
                if faults >= self.policy.max_attempts || !self.budget.withdraw() {
                    return Err(Error::Worker(status));
                }
            }
            metrics::retry(status.code());
            tokio::time::sleep(jittered(self.policy.backoff * (1u32 << faults.min(5)))).await;
        }
    }

    /// One call to one worker, bounded by the timeout; a worker that cannot be reached is
    /// marked down until its next successful health check.
    async fn attempt(
        &self,
        worker: &Arc<Worker>,
        session: &str,
        block: usize,
        persistence: Persistence,
    ) -> Result<DenoiseBlockResponse, Status> {
        let mut request = Request::new(DenoiseBlockRequest {
            session_id: session.to_string(),
            block_index: block as u32,
            kv_persistence: persistence.to_wire() as i32,
        });
        bd3lm_telemetry::inject(request.metadata_mut());
        let _in_flight = worker.enter();
        let mut client = worker.client();
        let call = client.denoise_block(request);
        let timeout = self.policy.timeout;
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(from_worker(status, &self.pool, worker)),
            Err(_) => {
                tracing::warn!(worker = %worker.addr, ?timeout, "block timed out");
                Err(Status::deadline_exceeded(format!(
                    "no denoise worker answered within {timeout:?}"
                )))
            }
        }
    }

    /// Asks the worker that served `session`'s last block to write the KV blobs of its
    /// window at `committed` blocks (a generation's end under [`Persistence::AtEnd`]).
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
        match tokio::time::timeout(self.policy.timeout, call).await {
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
