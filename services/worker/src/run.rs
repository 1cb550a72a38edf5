//! A run of blocks as the worker sees its caller: what the run asks for, the grants that
//! let its blocks be committed, the caller going away, and the heartbeats that tell the
//! caller the worker is still at work.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bd3lm_proto::v1::{
    DenoiseBlockRequest, DenoiseBlockResponse, DenoiseRunRequest, KvPersistence, RunControl,
    RunEvent, RunProgress, run_control, run_event,
};
use tokio::sync::mpsc;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::scheduler::{BatchStats, RunBounds};

/// Heartbeat interval when the caller names none, and its bounds.
const HEARTBEAT: Duration = Duration::from_millis(500);
const HEARTBEAT_RANGE: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(10));

/// A run as asked for, checked.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The session.
    pub session_id: String,
    /// The run's first block.
    pub first_block: usize,
    /// The block it ends before.
    pub end_block: usize,
    /// Whether committed blocks' KV blobs are written with them.
    pub write_blobs: bool,
    /// Whether a new session's computed prompt blocks go to the store's shared blocks:
    /// unless the caller keeps KV out of the store.
    pub share_in_store: bool,
    /// Token ids that end the run, looked for from `stop_from` on.
    pub stop_tokens: Vec<u32>,
    /// The generation's first new token.
    pub stop_from: usize,
    /// Between two progress messages; `None`: none sent.
    pub heartbeat: Option<Duration>,
}

impl RunSpec {
    /// The run of a `DenoiseRun` call; each fault names its field.
    pub fn from_wire(req: DenoiseRunRequest) -> Result<Self, Status> {
        if req.end_block <= req.first_block {
            return Err(Status::invalid_argument(
                "end_block: must be past first_block",
            ));
        }
        let heartbeat = match req.heartbeat_ms {
            0 => HEARTBEAT,
            ms => Duration::from_millis(ms.into()),
        };
        if !(HEARTBEAT_RANGE.0..=HEARTBEAT_RANGE.1).contains(&heartbeat) {
            return Err(Status::invalid_argument(
                "heartbeat_ms: must be from 50 to 10000",
            ));
        }
        Ok(Self {
            session_id: req.session_id,
            first_block: req.first_block as usize,
            end_block: req.end_block as usize,
            write_blobs: writes_blobs(req.kv_persistence)?,
            share_in_store: req.kv_persistence != KvPersistence::Never as i32,
            stop_tokens: req.stop_token_ids,
            stop_from: req.stop_from as usize,
            heartbeat: Some(heartbeat),
        })
    }

    /// The run of one block that a `DenoiseBlock` call is.
    pub fn one_block(req: DenoiseBlockRequest) -> Result<Self, Status> {
        Ok(Self {
            session_id: req.session_id,
            first_block: req.block_index as usize,
            end_block: req.block_index as usize + 1,
            write_blobs: writes_blobs(req.kv_persistence)?,
            share_in_store: req.kv_persistence != KvPersistence::Never as i32,
            stop_tokens: Vec::new(),
            stop_from: usize::MAX,
            heartbeat: None,
        })
    }

    /// The batch's bounds of the run, ending where `end` says.
    pub fn bounds(&self, end: Arc<AtomicUsize>) -> RunBounds {
        RunBounds {
            end,
            stop_tokens: self.stop_tokens.clone(),
            stop_from: self.stop_from,
        }
    }
}

/// Whether a block under `kv_persistence` (a `KvPersistence` on the wire) writes its
/// blobs: every block, unless the coordinator asked for none.
fn writes_blobs(kv_persistence: i32) -> Result<bool, Status> {
    match KvPersistence::try_from(kv_persistence) {
        Ok(KvPersistence::Unspecified | KvPersistence::EveryBlock) => Ok(true),
        Ok(KvPersistence::AtEnd | KvPersistence::Never) => Ok(false),
        Err(_) => Err(Status::invalid_argument(format!(
            "kv_persistence: unknown value {kv_persistence}"
        ))),
    }
}

/// The caller went away (or broke the protocol): the run stops and commits nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gone;

/// Where a run's events go.
pub type Events = mpsc::UnboundedSender<Result<RunEvent, Status>>;

/// The caller of a run: its controls in, the run's events out.
pub struct Caller<C> {
    controls: C,
    events: Events,
    /// Blocks below it may be committed.
    commit_below: usize,
    /// The block the run ends before, shared with the batch; a last grant lowers it.
    end: Arc<AtomicUsize>,
    beat: Option<Interval>,
    /// The block at work, and the batch passes when the last heartbeat went.
    block: usize,
    passes_seen: u64,
}

impl<C: Stream<Item = Result<RunControl, Status>> + Unpin> Caller<C> {
    /// The caller of `spec` (its first block granted by the start) on `controls` and
    /// `events`.
    pub fn new(spec: &RunSpec, controls: C, events: Events) -> Self {
        let beat = spec.heartbeat.map(|every| {
            let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            beat.set_missed_tick_behavior(MissedTickBehavior::Delay);
            beat
        });
        Self {
            controls,
            events,
            commit_below: spec.first_block + 1,
            end: Arc::new(AtomicUsize::new(spec.end_block)),
            beat,
            block: spec.first_block,
            passes_seen: 0,
        }
    }

    /// The block the run ends before, as the batch reads it.
    pub fn end(&self) -> Arc<AtomicUsize> {
        self.end.clone()
    }

    /// Waits for `work`, meanwhile taking grants and sending heartbeats: every interval
    /// while `batch` advanced since the last (always while there is none: a thread is
    /// opening the session).
    pub async fn wait<F: Future>(
        &mut self,
        work: F,
        batch: Option<&BatchStats>,
    ) -> Result<F::Output, Gone> {
        tokio::pin!(work);
        loop {
            tokio::select! {
                biased;
                out = &mut work => return Ok(out),
                signal = self.signal(batch) => signal?,
            }
        }
    }

    /// Waits until block `block` may be committed.
    pub async fn granted(&mut self, block: usize, batch: Option<&BatchStats>) -> Result<(), Gone> {
        self.block = block;
        while self.commit_below <= block {
            self.signal(batch).await?;
        }
        Ok(())
    }

    /// Whether the caller's last grant ends the run with block `block`.
    pub fn ends_with(&self, block: usize) -> bool {
        block + 1 >= self.end.load(Ordering::Acquire)
    }

    /// Sends a committed block; the caller may be gone.
    pub fn send(&mut self, answer: DenoiseBlockResponse) -> Result<(), Gone> {
        self.block = answer.committed_blocks as usize;
        let event = RunEvent {
            event: Some(run_event::Event::Block(answer)),
        };
        self.events.send(Ok(event)).map_err(|_| Gone)
    }

    /// One control taken, the caller found gone, or one heartbeat.
    async fn signal(&mut self, batch: Option<&BatchStats>) -> Result<(), Gone> {
        tokio::select! {
            control = self.controls.next() => self.take(control),
            () = self.events.closed() => Err(Gone),
            () = tick(&mut self.beat) => {
                self.heartbeat(batch);
                Ok(())
            }
        }
    }

    fn take(&mut self, control: Option<Result<RunControl, Status>>) -> Result<(), Gone> {
        let grant = match control {
            Some(Ok(RunControl {
                control: Some(run_control::Control::Grant(grant)),
            })) => grant,
            Some(Ok(_)) => {
                tracing::warn!("a run's caller sent something other than a grant; ending it");
                return Err(Gone);
            }
            Some(Err(_)) | None => return Err(Gone),
        };
        let below = grant.commit_below as usize;
        self.commit_below = self.commit_below.max(below);
        if grant.last {
            self.end.fetch_min(below, Ordering::AcqRel);
        }
        Ok(())
    }

    fn heartbeat(&mut self, batch: Option<&BatchStats>) {
        let passes = batch.map(|b| b.passes.load(Ordering::Relaxed));
        if passes.is_some_and(|p| p == self.passes_seen) {
            return;
        }
        self.passes_seen = passes.unwrap_or(self.passes_seen);
        let progress = RunProgress {
            block_index: self.block as u32,
            denoise_passes: self.passes_seen,
        };
        let event = RunEvent {
            event: Some(run_event::Event::Progress(progress)),
        };
        let _ = self.events.send(Ok(event));
    }
}

/// The next tick of `beat`; never without one.
async fn tick(beat: &mut Option<Interval>) {
    match beat {
        Some(beat) => {
            beat.tick().await;
        }
        None => std::future::pending().await,
    }
}
