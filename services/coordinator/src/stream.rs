//! Driving a planned generation: block after block through the dispatcher, each committed
//! block checked against the stop rules, decoded and streamed, until a stop or until the
//! client goes away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bd3lm_kvstore::record::short_id;
use bd3lm_kvstore::{SessionRecord, SessionStore};
use bd3lm_proto::v1::{BlockTiming, GenerateStreamResponse, StopReason as ProtoStop};
use bd3lm_text::{Decoder, StopReason};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::admission::Queueing;
use crate::dispatch::{BlockAnswer, Dispatcher, RunAsk, Runs};
use crate::error::Error;
use crate::metrics;
use crate::plan::{Plan, update};
use crate::settings::Persistence;

/// Where the messages of one generation go.
pub type Sender = mpsc::Sender<Result<GenerateStreamResponse, Status>>;

/// A generation in progress: the session's tokens as this request has seen them.
struct Progress {
    tokens: Vec<u32>,
    committed: usize,
    /// Tokens of this request's output already sent.
    shown: usize,
    forward_passes: u32,
    /// The model version of the session's last block: its next goes to a worker that has
    /// it loaded.
    model_version: Option<u64>,
    /// When the generation began, and whether a block has arrived since.
    began: Instant,
    answered: bool,
}

/// The generations in progress, by session, so that DeleteSession can stop them.
#[derive(Default)]
pub struct Active {
    sessions: Mutex<HashMap<String, Arc<watch::Sender<bool>>>>,
}

/// One generation in progress; its flag turns true when its session is deleted.
pub struct Running {
    active: Arc<Active>,
    session: String,
    deleted: watch::Receiver<bool>,
}

impl Active {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<watch::Sender<bool>>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a generation of `session`.
    pub fn enter(self: &Arc<Self>, session: &str) -> Running {
        let mut sessions = self.lock();
        let sender = sessions
            .entry(session.to_string())
            .or_insert_with(|| Arc::new(watch::channel(false).0));
        Running {
            deleted: sender.subscribe(),
            active: self.clone(),
            session: session.to_string(),
        }
    }

    /// Stops every generation of `session` (their blocks are dropped, which stops the
    /// workers' compute at the next step) and waits, at most `wait`, until they ended.
    pub async fn stop(&self, session: &str, wait: Duration) {
        let sender = self.lock().get(session).cloned();
        if let Some(sender) = sender {
            sender.send_replace(true);
            let _ = tokio::time::timeout(wait, sender.closed()).await;
        }
    }
}

impl Running {
    /// Resolves once the session is deleted.
    async fn deleted(&mut self) {
        let _ = self.deleted.wait_for(|deleted| *deleted).await;
    }

    fn is_deleted(&self) -> bool {
        *self.deleted.borrow()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut sessions = self.active.lock();
        // This generation's receiver is still counted until the fields drop.
        if sessions
            .get(&self.session)
            .is_some_and(|s| s.receiver_count() <= 1)
        {
            sessions.remove(&self.session);
        }
    }
}

/// One generation as it runs: the plan, what it has produced so far, and where its
/// messages go.
struct Generation<'a> {
    source: Blocks<'a>,
    plan: Plan,
    progress: Progress,
    decoder: Decoder<'a>,
    tx: Sender,
    running: Running,
}

/// Drives `plan` block by block, sending each block and a final message to `tx`. Stops
/// as soon as the receiver is gone (the client cancelled or disconnected) or the session
/// is deleted, without waiting for the block in flight: dropping it stops the worker.
/// The session's lease is given up once the returned tokens are stored.
#[tracing::instrument(skip_all, fields(session = %short_id(&plan.record.id)))]
pub async fn drive(
    store: &SessionStore,
    dispatch: &Dispatcher,
    plan: Plan,
    tx: Sender,
    running: Running,
) {
    let progress = Progress {
        tokens: plan.record.tokens.clone(),
        committed: plan.record.committed_blocks,
        shown: 0,
        forward_passes: 0,
        model_version: plan.record.model_version,
        began: Instant::now(),
        answered: false,
    };
    let model = plan.model.clone();
    let mut generation = Generation {
        source: Blocks {
            store,
            dispatch,
            persistence: plan.persistence,
            runs: Runs::default(),
            stop_tokens: stop_tokens(&plan.rules),
            start: plan.start,
            end: plan.start + plan.rules.max_new_tokens,
            block_size: model.info.block_size as usize,
            prefix: match dispatch.routes_by_prefix() {
                true => prompt_prefix(&plan.record, model.info.block_size as usize),
                false => Vec::new(),
            },
        },
        plan,
        progress,
        decoder: Decoder::new(&model.text),
        tx,
        running,
    };
    let stop = generation.blocks().await;
    generation.finish(stop).await;
}

impl Generation<'_> {
    /// The generation's blocks, each sent to the client, until a stop or an error.
    async fn blocks(&mut self) -> Result<StopReason, Error> {
        loop {
            if self.tx.is_closed() {
                return Ok(StopReason::Cancelled);
            }
            let started = Instant::now();
            let (plan, progress) = (&mut self.plan, &self.progress);
            let answer = tokio::select! {
                answer = self.source.next(&plan.record, progress, &plan.queueing) => answer?,
                () = self.tx.closed() => return Ok(StopReason::Cancelled),
                () = self.running.deleted() => return Ok(StopReason::Cancelled),
                loss = plan.lease.lost() => return Err(loss),
                () = until(plan.deadline) => return Err(Error::CallDeadline),
            };
            if !self.progress.answered {
                self.progress.answered = true;
                metrics::first_block(self.progress.began.elapsed());
                // Streaming now: its blocks wait their turn, however long.
                self.plan.queueing.deadline = None;
            }
            let (message, stop) = self.take_answer(answer, started);
            if self.tx.send(Ok(message)).await.is_err() {
                return Ok(StopReason::Cancelled);
            }
            if let Some(stop) = stop {
                return Ok(stop);
            }
        }
    }

    /// Ends the generation however it stopped: counted, the returned tokens stored unless
    /// it failed or its session was deleted, the lease given up, and the last message
    /// (its summary, or the error as the client sees it) sent.
    async fn finish(mut self, stop: Result<StopReason, Error>) {
        // The worker stops the run (a block in progress is never committed) and keeps
        // the session's state for the window's persisting and the next request.
        self.source.runs = Runs::default();
        let deleted = self.running.is_deleted();
        if let Err(e) = &stop {
            tracing::warn!(error = %e, "generation failed");
        }
        let last = match stop {
            Ok(stop) => {
                metrics::generation(
                    if deleted { "deleted" } else { stop.name() },
                    self.progress.began,
                );
                if deleted {
                    tracing::info!("session deleted; generation stopped");
                } else {
                    if stop == StopReason::Cancelled {
                        tracing::info!("client went away; generation stopped");
                    }
                    if self.progress.answered {
                        let (session, committed) = (&self.plan.record.id, self.progress.committed);
                        self.source.persist_window(session, committed).await;
                    }
                    let returned = self.plan.start + self.progress.shown;
                    record_returned(self.source.store, &self.plan.record, returned).await;
                }
                Ok(GenerateStreamResponse {
                    session_id: self.plan.record.id.clone(),
                    stop_reason: proto_stop(stop) as i32,
                    forward_passes: self.progress.forward_passes,
                    seed: self.plan.record.seed,
                    text: self.decoder.finish(),
                    prompt_tokens: self.plan.start as u32,
                    ..Default::default()
                })
            }
            Err(e) => {
                let status = e.into_status();
                metrics::generation(metrics::code_name(status.code()), self.progress.began);
                Err(status)
            }
        };
        self.plan.lease.release().await;
        let _ = self.tx.send(last).await;
    }

    /// Takes a worker's answer into the progress; returns the block's message and the
    /// stop, if the block ended the generation.
    fn take_answer(
        &mut self,
        answer: BlockAnswer,
        started: Instant,
    ) -> (GenerateStreamResponse, Option<StopReason>) {
        let (plan, progress) = (&mut self.plan, &mut self.progress);
        let r = &answer.response;
        let bs = plan.model.info.block_size as usize;
        let first = r.block_index as usize * bs;
        let end = first + r.token_ids.len();
        if progress.tokens.len() < end {
            progress.tokens.resize(end, 0);
        }
        progress.tokens[first..end].copy_from_slice(&r.token_ids);
        progress.committed = r.committed_blocks as usize;
        progress.forward_passes += r.forward_passes;
        progress.model_version = r.model_version.or(progress.model_version);
        let done = (progress.committed * bs).min(progress.tokens.len());
        let generated = &progress.tokens[plan.start.min(done)..done];
        let (visible, stop) = plan.rules.check(generated, &progress.tokens[..done]);
        let new = generated[progress.shown.min(visible)..visible].to_vec();
        progress.shown = progress.shown.max(visible);
        metrics::tokens(new.len());
        let text = self.decoder.push(&new);
        let block = BlockTiming {
            index: r.block_index,
            forward_passes: r.forward_passes,
            steps: r.steps,
            cache_ms: r.cache_ms,
            denoise_ms: r.denoise_ms,
            commit_ms: r.commit_ms,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            queue_ms: answer.queued.as_secs_f64() * 1e3,
            cache_source: r.cache_source.clone(),
            worker: answer.worker,
            model_version: r.model_version,
            prefix_blocks: r.prefix_blocks,
        };
        let message = GenerateStreamResponse {
            session_id: plan.record.id.clone(),
            token_ids: new,
            text,
            block: Some(block),
            seed: plan.record.seed,
            ..Default::default()
        };
        (message, stop)
    }
}

/// Where a generation's blocks come from: the workers through the dispatcher, in runs
/// (writing their KV blobs as `persistence` says, ended early by `stop_tokens`), and the
/// store to put a lost session back into.
struct Blocks<'a> {
    store: &'a SessionStore,
    dispatch: &'a Dispatcher,
    persistence: Persistence,
    runs: Runs,
    stop_tokens: Vec<u32>,
    /// Where the generation's output starts and where its longest ends.
    start: usize,
    end: usize,
    block_size: usize,
    /// A new session's first prompt's whole blocks' shared addresses (empty otherwise).
    prefix: Vec<u64>,
}

/// The shared addresses of a new session's first prompt's whole blocks (per owner, as
/// the workers share them), by which it is routed to a worker holding them; none for a
/// session with committed blocks.
fn prompt_prefix(record: &SessionRecord, block_size: usize) -> Vec<u64> {
    if record.committed_blocks > 0 {
        return Vec::new();
    }
    let whole = record.prompt_len.min(record.tokens.len()) / block_size;
    let owner = record.owner.as_deref();
    bd3lm_kvstore::blob::shared_prefix_addresses(&record.tokens, block_size, whole, owner)
        .unwrap_or_default()
}

/// The token ids that end a generation of `rules` whichever block holds them: the end of
/// sequence and one-token stop sequences (a worker ends its run with such a block).
fn stop_tokens(rules: &bd3lm_text::StopRules) -> Vec<u32> {
    let single = rules.stop_sequences.iter().filter(|s| s.len() == 1);
    rules.eos.into_iter().chain(single.map(|s| s[0])).collect()
}

/// Resolves at `deadline`; never without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl Blocks<'_> {
    /// Under [`Persistence::AtEnd`], has the worker of `session`'s last block write its
    /// KV window at `committed` blocks, still under the lease: a continuation then reads
    /// it instead of rebuilding.
    async fn persist_window(&self, session: &str, committed: usize) {
        if self.persistence == Persistence::AtEnd {
            let written = self.dispatch.persist_kv(session, committed).await;
            tracing::debug!(committed, written, "KV window persisted at the end");
        }
    }

    /// The next block from the workers. When the store lost the session (flushed,
    /// evicted, restarted) or some of its committed blocks (a failover to a replica that
    /// had not received them: Redis replicates asynchronously), this request holds every
    /// committed token: it puts them back (unless the session was deleted: its tombstone
    /// refuses that) and asks again, and the workers rebuild the KV state from the tokens.
    /// The store may lose them again meanwhile (a second restart): so again, a few times.
    async fn next(
        &mut self,
        planned: &SessionRecord,
        progress: &Progress,
        queueing: &Queueing,
    ) -> Result<BlockAnswer, Error> {
        let mut restores = 0;
        loop {
            let committed = progress.committed;
            let ask = RunAsk {
                session: &planned.id,
                block: committed,
                blocks_left: self.end.div_ceil(self.block_size).saturating_sub(committed),
                version: progress.model_version,
                persistence: self.persistence,
                stop_tokens: &self.stop_tokens,
                stop_from: self.start,
                prefix: if committed == 0 { &self.prefix } else { &[] },
            };
            let answer = (self.dispatch)
                .next_block(&mut self.runs, &ask, queueing)
                .await;
            let lost = match &answer {
                Err(e) if e.is_missing() => "lost",
                Err(e) if e.is_ahead_of_store() => "behind",
                _ => return answer,
            };
            if restores == MAX_RESTORES {
                tracing::error!(
                    restores,
                    "the store lost the session after every restore; giving up"
                );
                return answer;
            }
            restores += 1;
            tracing::warn!(
                committed,
                restores,
                lost,
                "the store lost the session's blocks; restoring them"
            );
            if !self.restore(planned, progress).await? {
                return answer;
            }
            metrics::restore(lost);
        }
    }

    /// Puts the session as `progress` holds it back into the store: a missing record under
    /// a fresh version (no writer that read the lost record can match it), a record that
    /// lost committed blocks by appending them. Whether it was put back: not when the
    /// stored record is not an earlier state of this one.
    async fn restore(&self, planned: &SessionRecord, progress: &Progress) -> Result<bool, Error> {
        let Some(stored) = self
            .store
            .get_session(&planned.model_id, &planned.id)
            .await?
        else {
            let mut record = planned.clone();
            record.tokens.clone_from(&progress.tokens);
            record.committed_blocks = progress.committed;
            record.version = 2 + u64::from(rand::random::<u32>());
            return match self.store.create_session(&record).await {
                Ok(_) | Err(bd3lm_kvstore::Error::SessionExists(_)) => Ok(true),
                Err(e) => Err(e.into()),
            };
        };
        let earlier = stored.committed_blocks < progress.committed
            && progress.tokens.starts_with(&stored.tokens);
        if !earlier {
            return Ok(false);
        }
        let mut record = stored.clone();
        record.tokens.clone_from(&progress.tokens);
        record.committed_blocks = progress.committed;
        // Superseded: another writer moved it meanwhile, and the next try finds out how.
        self.store.update_session(&record, stored.base()).await?;
        Ok(true)
    }
}

/// Times one block may put its session back into a store that keeps losing it (a block
/// that waits out worker faults can span several store restarts); beyond it the store is
/// taken to be misconfigured (workers reading other keys) and the block fails.
const MAX_RESTORES: usize = 16;

/// Stores how far the client has seen the session, so a continuation starts there.
async fn record_returned(store: &SessionStore, record: &SessionRecord, returned: usize) {
    let result = update(store, &record.model_id, &record.id, None, |current| {
        current.returned = returned.min(current.tokens.len());
        Ok(())
    });
    match result.await {
        Ok(_) => {}
        Err(e) if e.is_missing() => {}
        Err(e) => tracing::warn!(error = %e, "recording the returned tokens failed"),
    }
}

/// The wire's stop reason.
pub fn proto_stop(stop: StopReason) -> ProtoStop {
    match stop {
        StopReason::MaxTokens => ProtoStop::MaxTokens,
        StopReason::Eos => ProtoStop::Eos,
        StopReason::LowEntropy => ProtoStop::LowEntropy,
        StopReason::StopSequence => ProtoStop::StopSequence,
        StopReason::Cancelled => ProtoStop::Cancelled,
    }
}
