//! Continuous batching: one thread owns the running batch of blocks, each of another
//! session, and steps it. A step advances every block's sampler to its next forward
//! pass, commits the finished blocks together in one pass, and runs one denoise pass over
//! the rows every other block asked for. Blocks join between steps (within the batch
//! limits, first come first served); a session stays in the batch for its run of blocks,
//! beginning the next block in the step after it committed one, and leaves when its run
//! ends, or at the next step once its request went away; its capacity slot goes with it.
//!
//! Opening a session (a store decode, a rebuild from tokens, a prefill) happens before a
//! block is handed here, so it never stalls the batch.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bd3lm_diffusion::{BlockDenoiser, BlockOutcome, BlockRng, Error, Session, Step};
use bd3lm_kvstore::SessionRecord;
use candle_core::DType;
use rayon::prelude::*;
use tokio::sync::mpsc;

use crate::LoadedModel;
use crate::block::{self, BlockWork, Effort};
use crate::cache::CacheSource;
use crate::sessions::SessionState;
use crate::settings::WorkerLimits;

/// Where a session's state goes when it leaves the batch: back to the worker's memory.
pub type Park = Box<dyn FnOnce(SessionState) + Send>;

/// How far a session's run goes and what ends it early.
#[derive(Debug, Clone)]
pub struct RunBounds {
    /// The block index the run ends before; its caller may lower it while the run goes.
    pub end: Arc<AtomicUsize>,
    /// Token ids that end the run with the block holding one at `stop_from` or later.
    pub stop_tokens: Vec<u32>,
    /// The first position stop tokens are looked for at.
    pub stop_from: usize,
}

impl RunBounds {
    /// Whether the run ends with the committed block `index` of `tokens` (its
    /// `block_size` tokens at `index * block_size`).
    fn ends_with(&self, tokens: &[u32], index: usize, block_size: usize) -> bool {
        let from = (index * block_size).max(self.stop_from);
        let to = ((index + 1) * block_size).min(tokens.len());
        index + 1 >= self.end.load(Ordering::Acquire)
            || tokens
                .get(from..to)
                .is_some_and(|t| t.iter().any(|t| self.stop_tokens.contains(t)))
    }
}

/// A session's run handed to the scheduler.
pub struct PendingBlock {
    /// The session's record as read before the run.
    pub record: SessionRecord,
    /// Its state: every committed block in the cache.
    pub state: SessionState,
    /// Where the cache came from.
    pub source: CacheSource,
    /// Its length and stop tokens.
    pub run: RunBounds,
    /// Where each block's work goes; dropping the receiver cancels the block in progress
    /// (never committed) and ends the run.
    pub reply: mpsc::UnboundedSender<bd3lm_diffusion::Result<BlockWork>>,
    /// Where the session's state goes when it leaves the batch.
    pub park: Park,
    /// Held until the session leaves the batch: the worker's capacity slot.
    pub slot: Box<dyn Send>,
    /// The request's span, which the block's events in the batch belong to.
    pub span: tracing::Span,
    /// Whether the committed blocks' KV blobs are written with them.
    pub write_blobs: bool,
}

/// Counters of the running batch, read by `Info`.
#[derive(Debug, Default)]
pub struct BatchStats {
    /// Blocks in the running batch.
    pub batch_size: AtomicUsize,
    /// Denoise passes run.
    pub passes: AtomicU64,
    /// Blocks in those passes, summed: divided by `passes`, the mean batch size.
    pub batched_blocks: AtomicU64,
    /// Microseconds those passes took, summed.
    pub pass_micros: AtomicU64,
}

/// The scheduler thread is gone (it panicked): no block can be batched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// The handle on the scheduler thread; dropping it ends the thread once its batch is done.
pub struct Scheduler {
    queue: mpsc::UnboundedSender<PendingBlock>,
    stats: Arc<BatchStats>,
}

impl Scheduler {
    /// Starts the thread that batches blocks of `loaded` within `limits`.
    pub fn start(loaded: Arc<LoadedModel>, limits: WorkerLimits) -> std::io::Result<Self> {
        let (queue, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(BatchStats::default());
        let shared = stats.clone();
        std::thread::Builder::new()
            .name("bd3lm-batch".into())
            .spawn(move || Batch::new(&loaded, limits, shared).run(rx))?;
        Ok(Self { queue, stats })
    }

    /// Hands `pending` over; an error when the thread has stopped (the block is dropped).
    pub fn submit(&self, pending: PendingBlock) -> Result<(), Stopped> {
        self.queue.send(pending).map_err(|_| Stopped)
    }

    /// The batch's counters.
    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }
}

/// One session in the batch, at work on a block of its run.
struct Entry<'m> {
    /// The record as of the last block committed in the batch.
    record: SessionRecord,
    source: CacheSource,
    run: RunBounds,
    reply: mpsc::UnboundedSender<bd3lm_diffusion::Result<BlockWork>>,
    park: Park,
    slot: Box<dyn Send>,
    span: tracing::Span,
    write_blobs: bool,
    session: Session<'m>,
    denoiser: BlockDenoiser,
    rng: BlockRng,
    first_block: usize,
    /// The rows and noise level of the pass the sampler waits for.
    asked: Option<(Vec<u32>, f64)>,
    joined: Instant,
    /// Set once the sampler is done.
    outcome: Option<(BlockOutcome, Duration)>,
}

impl Entry<'_> {
    /// The session leaves the batch: its state back to the worker's memory.
    fn leave(self) {
        let Entry {
            session,
            park,
            slot,
            ..
        } = self;
        drop(slot);
        park(SessionState::of(session));
    }

    /// Begins the session's next block: its sampler and random stream.
    fn next_block(&mut self) -> bd3lm_diffusion::Result<()> {
        self.denoiser = self.session.begin_block(&self.record.sampling)?;
        self.first_block = self.session.next_block_index();
        self.rng = bd3lm_diffusion::block_rng(self.record.seed, self.first_block);
        self.joined = Instant::now();
        Ok(())
    }
}

/// The scheduler thread's state.
struct Batch<'m> {
    loaded: &'m LoadedModel,
    limits: WorkerLimits,
    stats: Arc<BatchStats>,
    waiting: VecDeque<PendingBlock>,
    running: Vec<Entry<'m>>,
}

impl<'m> Batch<'m> {
    fn new(loaded: &'m LoadedModel, limits: WorkerLimits, stats: Arc<BatchStats>) -> Self {
        Self {
            loaded,
            limits,
            stats,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    /// Steps the batch until the handle is dropped and nothing is left.
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<PendingBlock>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.blocking_recv() {
                    Some(pending) => self.waiting.push_back(pending),
                    None => return,
                }
            }
            while let Ok(pending) = rx.try_recv() {
                self.waiting.push_back(pending);
            }
            self.admit();
            self.step();
            self.stats
                .batch_size
                .store(self.running.len(), Ordering::Relaxed);
        }
    }

    /// Moves waiting blocks into the batch, oldest first, while the limits allow; an
    /// empty batch always takes one.
    fn admit(&mut self) {
        // A block whose request went away while it waited never joins.
        self.waiting.retain(|pending| !pending.reply.is_closed());
        let bs = self.loaded.model.config().block_size;
        let mut kv: u64 = self.running.iter().map(|e| kv_bytes(&e.session)).sum();
        while let Some(pending) = self.waiting.front() {
            let n = self.running.len();
            let cost = pending.state.cache.allocated_bytes() as u64;
            let fits = n < self.limits.max_batch
                && (n + 1) * bs <= self.limits.max_rows
                && kv + cost <= self.limits.kv_budget;
            if n > 0 && !fits {
                break;
            }
            let pending = self.waiting.pop_front().expect("a front");
            kv += cost;
            if let Some(entry) = self.open(pending) {
                self.running.push(entry);
            }
        }
    }

    /// The batch entry of `pending`; `None` (the error answered) when its state is unusable.
    fn open(&self, pending: PendingBlock) -> Option<Entry<'m>> {
        let PendingBlock {
            record,
            state,
            source,
            run,
            reply,
            park,
            slot,
            span,
            write_blobs,
        } = pending;
        let model = &self.loaded.model;
        let opened = Session::with_cache(
            model,
            state.cache,
            &state.tokens,
            record.prompt_len,
            state.committed,
        )
        .and_then(|s| s.begin_block(&record.sampling).map(|d| (s, d)));
        let (session, denoiser) = match opened {
            Ok(pair) => pair,
            Err(e) => {
                let _ = reply.send(Err(e));
                return None;
            }
        };
        let first_block = session.next_block_index();
        Some(Entry {
            rng: bd3lm_diffusion::block_rng(record.seed, first_block),
            record,
            source,
            run,
            reply,
            park,
            slot,
            span,
            write_blobs,
            session,
            denoiser,
            first_block,
            asked: None,
            joined: Instant::now(),
            outcome: None,
        })
    }

    /// One step: cancelled blocks leave, every sampler advances, then one pass denoises
    /// the rows the samplers asked for and commits the finished blocks.
    fn step(&mut self) {
        let (gone, running) = std::mem::take(&mut self.running)
            .into_iter()
            .partition(|e| e.reply.is_closed());
        self.running = running;
        for e in gone {
            e.span.in_scope(|| {
                tracing::info!(
                    block = e.first_block,
                    "block cancelled: its request went away"
                )
            });
            e.leave();
        }
        for e in &mut self.running {
            if e.asked.is_some() || e.outcome.is_some() {
                continue;
            }
            match e.denoiser.advance(&mut e.rng) {
                Step::Logits { rows, t } => e.asked = Some((rows, t)),
                Step::Done => {
                    let outcome = e.denoiser.outcome();
                    e.session.place_block(&outcome.tokens);
                    e.outcome = Some((outcome, e.joined.elapsed()));
                }
            }
        }
        if self.running.is_empty() {
            return;
        }
        let started = Instant::now();
        let passed = tracing::debug_span!("batch_pass", blocks = self.running.len())
            .in_scope(|| self.pass());
        let took = started.elapsed();
        crate::metrics::batch_pass(self.running.len(), took);
        self.stats.passes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .pass_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.stats
            .batched_blocks
            .fetch_add(self.running.len() as u64, Ordering::Relaxed);
        match passed {
            Ok(logits) => self.after_pass(logits, took),
            Err(err) => {
                tracing::error!(error = %err, blocks = self.running.len(), "batched pass failed");
                // The caches may hold part of the failed pass: none is kept.
                for e in self.running.drain(..) {
                    let Entry { reply, slot, .. } = e;
                    drop(slot);
                    let _ = reply.send(Err(Error::Batch(err.to_string())));
                }
            }
        }
    }

    /// The batched forward pass: every asked row's logits, block after block; finished
    /// blocks are committed in it.
    fn pass(&mut self) -> bd3lm_diffusion::Result<Vec<Vec<f32>>> {
        let mut inputs = Vec::with_capacity(self.running.len());
        let mut rows: Vec<&[u32]> = Vec::with_capacity(self.running.len());
        for e in &mut self.running {
            match (&e.asked, &e.outcome) {
                (_, Some(_)) => {
                    rows.push(&[]);
                    inputs.push(e.session.commit_input());
                }
                (Some((asked, t)), None) => {
                    rows.push(asked);
                    inputs.push(e.session.denoise_input(e.denoiser.tokens(), *t));
                }
                (None, None) => unreachable!("every running block advanced to a pass"),
            }
        }
        let logits = self.loaded.model.batch_pass(&mut inputs, &rows)?;
        Ok(logits.to_dtype(DType::F32)?.to_vec2()?)
    }

    /// Hands each block that asked for logits its rows, block after block as the pass
    /// computed them. The samplers turn them into distributions (a softmax and a nucleus
    /// over the vocabulary per row) in parallel: each touches only its own block, so the
    /// order they run in changes nothing.
    fn supply(&mut self, logits: Vec<Vec<f32>>) {
        let mut logits = logits.into_iter();
        let mut supplies = Vec::with_capacity(self.running.len());
        for e in &mut self.running {
            if let Some((asked, _)) = e.asked.take() {
                let rows: Vec<Vec<f32>> = logits.by_ref().take(asked.len()).collect();
                supplies.push((&mut e.denoiser, asked, rows));
            }
        }
        supplies
            .into_par_iter()
            .for_each(|(denoiser, asked, rows)| denoiser.supply(&asked, &rows));
    }

    /// Gives the samplers their logits and answers the committed blocks; a session
    /// whose run goes on begins its next block, the others leave.
    fn after_pass(&mut self, logits: Vec<Vec<f32>>, took: Duration) {
        self.supply(logits);
        let bs = self.loaded.model.config().block_size;
        let mut still = Vec::with_capacity(self.running.len());
        for mut e in std::mem::take(&mut self.running) {
            if e.outcome.is_none() {
                still.push(e);
                continue;
            }
            e.session.mark_committed();
            let (outcome, denoise) = e.outcome.take().expect("finished");
            let effort = Effort {
                first_block: e.first_block,
                source: e.source,
                reused: 0,
                forward_passes: outcome.forward_passes,
                steps: outcome.steps,
                denoise,
                commit: took,
            };
            e.span.in_scope(|| {
                tracing::debug!(
                    passes = effort.forward_passes,
                    denoise_ms = effort.denoise.as_secs_f64() * 1e3,
                    "block denoised and committed in the batch"
                )
            });
            let ends = e.run.ends_with(e.session.tokens(), e.first_block, bs);
            let work = block::finish(self.loaded, &e.record, &e.session, effort, e.write_blobs);
            let work = work.map(|mut w| {
                w.ends_run = ends;
                e.record.clone_from(&w.record);
                w
            });
            if ends || work.is_err() {
                // The slot is free before the answer leaves, so the next run finds room.
                let reply = e.reply.clone();
                e.leave();
                let _ = reply.send(work);
                continue;
            }
            if e.reply.send(work).is_err() {
                e.leave();
                continue;
            }
            // The next block is from memory, whatever the first came from.
            e.source = CacheSource::Memory;
            match e.next_block() {
                Ok(()) => still.push(e),
                Err(err) => {
                    let _ = e.reply.send(Err(err));
                    e.leave();
                }
            }
        }
        self.running = still;
    }
}

/// Bytes a session's cache occupies in the batch.
fn kv_bytes(session: &Session) -> u64 {
    session.cache().allocated_bytes() as u64
}
