//! Dispatch of one block to the workers: the worker holding the session first, another
//! on an error, a timeout or a disconnect, until one answers or the attempts run out.
//! The same seed gives the same tokens wherever the block runs, so a retry is safe.

use std::sync::Arc;
use std::time::Duration;

use bd3lm_proto::v1::{DenoiseBlockRequest, DenoiseBlockResponse};
use tonic::{Code, Request, Status};

use crate::pool::{Pool, Worker};

/// A worker's answer for a block.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockAnswer {
    /// What the worker returned.
    pub response: DenoiseBlockResponse,
    /// The worker's address.
    pub worker: String,
}

/// Sends blocks to the pool's workers with retries.
pub struct Dispatcher {
    pool: Arc<Pool>,
    timeout: Duration,
    max_attempts: u32,
    backoff: Duration,
}

impl Dispatcher {
    /// A dispatcher over `pool`: at most `max_attempts` tries per block, each waiting up to
    /// `timeout`, pausing `backoff` (doubled per attempt, at most 32x) in between.
    pub fn new(pool: Arc<Pool>, timeout: Duration, max_attempts: u32, backoff: Duration) -> Self {
        Self {
            pool,
            timeout,
            max_attempts,
            backoff,
        }
    }

    /// Asks workers for block `block` of `session` until one answers. A request fault
    /// (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, OUT_OF_RANGE) is returned at
    /// once; anything else is tried on another worker.
    #[tracing::instrument(skip(self))]
    pub async fn denoise_block(&self, session: &str, block: usize) -> Result<BlockAnswer, Status> {
        let mut tried: Vec<String> = Vec::new();
        let mut last = Status::unavailable("no healthy denoise worker");
        for attempt in 0..self.max_attempts {
            if attempt > 0 {
                tokio::time::sleep(self.backoff * (1u32 << attempt.min(5))).await;
            }
            // Once every worker has failed, they all get another chance.
            let worker = self.pool.pick(session, &tried).or_else(|| {
                tried.clear();
                self.pool.pick(session, &tried)
            });
            let Some(worker) = worker else {
                continue; // none is healthy (yet)
            };
            match self.attempt(&worker, session, block).await {
                Ok(response) => {
                    self.pool.remember(session, &worker.addr);
                    return Ok(BlockAnswer {
                        response,
                        worker: worker.addr.clone(),
                    });
                }
                Err(status) if is_request_fault(status.code()) => return Err(status),
                Err(status) => {
                    tracing::warn!(worker = %worker.addr, code = ?status.code(), "block failed; retrying elsewhere");
                    last = status;
                }
            }
            tried.push(worker.addr.clone());
        }
        Err(last)
    }

    /// One call to one worker, bounded by the timeout; a worker that cannot be reached is
    /// marked down until its next successful health check.
    async fn attempt(
        &self,
        worker: &Arc<Worker>,
        session: &str,
        block: usize,
    ) -> Result<DenoiseBlockResponse, Status> {
        let mut request = Request::new(DenoiseBlockRequest {
            session_id: session.to_string(),
            block_index: block as u32,
        });
        bd3lm_telemetry::inject(request.metadata_mut());
        let _in_flight = worker.enter();
        let mut client = worker.client();
        let call = client.denoise_block(request);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => {
                if is_transport_failure(&status) {
                    worker.mark_down();
                }
                Err(status)
            }
            Err(_) => {
                tracing::warn!(worker = %worker.addr, timeout = ?self.timeout, "block timed out");
                Err(Status::deadline_exceeded(format!(
                    "no denoise worker answered within {:?}",
                    self.timeout
                )))
            }
        }
    }
}

/// Faults of the request itself: no other worker would answer differently.
fn is_request_fault(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::OutOfRange
    )
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
