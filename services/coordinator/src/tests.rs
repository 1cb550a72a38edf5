//! The coordinator's routing, retry, timeout and restore paths against fake denoise
//! workers served in this process over real gRPC: each fault is scripted, so every test
//! is deterministic and none waits on a guess of how long something takes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bd3lm_kvstore::{CommitOutcome, SessionStore, StoreConfig};
use bd3lm_proto::status::from_store;
use bd3lm_proto::v1::denoise_worker_server::{DenoiseWorker, DenoiseWorkerServer};
use bd3lm_proto::v1::generate_request::Prompt;
use bd3lm_proto::v1::generation_server::Generation;
use bd3lm_proto::v1::{
    DeleteSessionRequest, DenoiseBlockRequest, DenoiseBlockResponse, DenoiseRunRequest,
    GenerateRequest, GenerateResponse, GenerateStreamResponse, InfoRequest, InfoResponse,
    KvPersistence, PersistKvRequest, PersistKvResponse, RunControl, RunEvent, StopReason, TokenIds,
    run_control, run_event,
};
use tokio::sync::oneshot;
use tokio_stream::StreamExt;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::{Coordinator, CoordinatorSettings, Persistence, Pool, Routing, WorkerSource};

const BLOCK: usize = 4;

/// What a fake worker does with its next call.
#[derive(Debug, Clone, Copy)]
enum Act {
    /// Denoise and commit the block.
    Serve,
    /// Answer with this code.
    Fail(Code),
    /// Never answer.
    Hang,
    /// Send heartbeats for this many milliseconds, then serve.
    Slow(u64),
    /// Lose the session from the store (a flush), then serve (and so find nothing).
    Flush,
}

/// A denoise worker whose tokens are a function of (seed, block, position) and whose
/// faults follow a script; it reads and commits sessions in the real store.
struct Fake {
    /// Its `Info.worker_id`.
    id: String,
    store: SessionStore,
    script: Mutex<VecDeque<Act>>,
    calls: AtomicUsize,
    /// Calls being answered now, and the most at once.
    active: AtomicUsize,
    most_active: AtomicUsize,
    /// Hanging calls whose request was dropped by the coordinator.
    dropped: AtomicUsize,
    /// The `kv_persistence` of every block asked for.
    persistence: Mutex<Vec<i32>>,
    /// The `committed_blocks` of every PersistKv call.
    persisted: Mutex<Vec<u32>>,
    /// Its `Info.capacity`.
    capacity: AtomicUsize,
}

/// Counts a hanging call dropped before it answered.
struct DropCount<'a>(&'a AtomicUsize);

impl Drop for DropCount<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl Fake {
    fn next_act(&self) -> Act {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut script = self.script.lock().unwrap();
        script.pop_front().unwrap_or(Act::Serve)
    }

    async fn serve(&self, session: &str, b: usize) -> Result<DenoiseBlockResponse, Status> {
        let record = self.store.get_session("fake", session).await;
        let record = record.map_err(from_store)?;
        let record = record.ok_or_else(|| Status::not_found("session_id: no session"))?;
        if b != record.committed_blocks {
            return Err(Status::failed_precondition(
                "block_index: not the next block",
            ));
        }
        let mut next = record.clone();
        let fixed = next.tokens.len().saturating_sub(b * BLOCK).min(BLOCK);
        for i in fixed..BLOCK {
            next.tokens
                .push(((record.seed as usize + 31 * b + 7 * i) % 90 + 1) as u32);
        }
        next.committed_blocks = b + 1;
        let outcome = self.store.update_session(&next, record.base()).await;
        let outcome = outcome.map_err(from_store)?;
        assert!(matches!(outcome, CommitOutcome::Committed(_)));
        Ok(DenoiseBlockResponse {
            block_index: b as u32,
            token_ids: next.tokens[b * BLOCK..(b + 1) * BLOCK].to_vec(),
            committed_blocks: next.committed_blocks as u32,
            forward_passes: 1,
            cache_source: "fake".into(),
            ..Default::default()
        })
    }
}

/// Decrements its counter when dropped.
struct Leave<'a>(&'a AtomicUsize);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The gRPC face of a shared [`Fake`].
struct FakeService(Arc<Fake>);

impl Fake {
    /// The next act's work on a block before its commit: `None` for a hang, else
    /// whether to commit it or fail.
    async fn act(&self, (events, heartbeat): (&Events, Duration)) -> Option<Result<(), Status>> {
        match self.next_act() {
            Act::Serve => Some(Ok(())),
            Act::Slow(ms) => {
                let started = std::time::Instant::now();
                while started.elapsed() < Duration::from_millis(ms) {
                    tokio::time::sleep(heartbeat).await;
                    let progress = RunEvent {
                        event: Some(run_event::Event::Progress(Default::default())),
                    };
                    events.send(Ok(progress)).await.ok()?;
                }
                Some(Ok(()))
            }
            Act::Fail(code) => Some(Err(Status::new(code, "scripted failure"))),
            Act::Hang => None,
            Act::Flush => {
                self.store.flush_memory();
                Some(Ok(()))
            }
        }
    }

    /// A run as the real worker runs it: each block begun as soon as the one before it
    /// was sent (its act taken then), committed and sent once granted; a hang sends
    /// nothing until the caller goes.
    async fn run(
        &self,
        start: DenoiseRunRequest,
        mut controls: Streaming<RunControl>,
        events: Events,
    ) {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_active.fetch_max(now, Ordering::SeqCst);
        let _active = Leave(&self.active);
        let heartbeat = Duration::from_millis(start.heartbeat_ms.into());
        let (mut granted, mut end) = (start.first_block as usize + 1, start.end_block as usize);
        for b in start.first_block as usize..start.end_block as usize {
            if b >= end {
                return;
            }
            let Some(work) = self.act((&events, heartbeat)).await else {
                let _dropped = DropCount(&self.dropped);
                return events.closed().await;
            };
            while work.is_ok() && granted <= b {
                match controls.message().await {
                    Ok(Some(RunControl {
                        control: Some(run_control::Control::Grant(g)),
                    })) => {
                        granted = g.commit_below as usize;
                        if g.last {
                            end = granted;
                        }
                    }
                    _ => return,
                }
            }
            let answer = match work {
                Ok(()) => self.serve(&start.session_id, b).await,
                Err(status) => Err(status),
            };
            let event = answer.map(|block| RunEvent {
                event: Some(run_event::Event::Block(block)),
            });
            let failed = event.is_err();
            if events.send(event).await.is_err() || failed {
                return;
            }
        }
    }
}

type Events = tokio::sync::mpsc::Sender<Result<RunEvent, Status>>;

#[tonic::async_trait]
impl DenoiseWorker for FakeService {
    async fn denoise_block(
        &self,
        _: Request<DenoiseBlockRequest>,
    ) -> Result<Response<DenoiseBlockResponse>, Status> {
        Err(Status::unimplemented("the coordinator asks for runs"))
    }

    type DenoiseRunStream = tokio_stream::wrappers::ReceiverStream<Result<RunEvent, Status>>;

    async fn denoise_run(
        &self,
        request: Request<Streaming<RunControl>>,
    ) -> Result<Response<Self::DenoiseRunStream>, Status> {
        let mut controls = request.into_inner();
        let Some(RunControl {
            control: Some(run_control::Control::Start(start)),
        }) = controls.message().await?
        else {
            return Err(Status::invalid_argument("start"));
        };
        self.0
            .persistence
            .lock()
            .unwrap()
            .push(start.kv_persistence);
        let (events, stream) = tokio::sync::mpsc::channel(4);
        let fake = self.0.clone();
        tokio::spawn(async move { fake.run(start, controls, events).await });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            stream,
        )))
    }

    async fn persist_kv(
        &self,
        request: Request<PersistKvRequest>,
    ) -> Result<Response<PersistKvResponse>, Status> {
        let committed = request.into_inner().committed_blocks;
        self.0.persisted.lock().unwrap().push(committed);
        Ok(Response::new(PersistKvResponse {
            blocks_written: committed,
            bytes_written: 0,
        }))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            model_id: "fake".into(),
            block_size: BLOCK as u32,
            vocab_size: 100,
            mask_id: 99,
            model_length: 64,
            capacity: self.0.capacity.load(Ordering::SeqCst) as u32,
            worker_id: self.0.id.clone(),
            ..Default::default()
        }))
    }
}

/// A fake worker on a loopback port, stopped when `stop` is sent or dropped.
struct Running {
    fake: Arc<Fake>,
    addr: String,
    stop: Option<oneshot::Sender<()>>,
}

async fn start(store: &SessionStore) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let fake = Arc::new(Fake {
        id: format!("fake-{}", listener.local_addr().unwrap().port()),
        store: store.clone(),
        script: Mutex::default(),
        calls: AtomicUsize::new(0),
        active: AtomicUsize::new(0),
        most_active: AtomicUsize::new(0),
        dropped: AtomicUsize::new(0),
        persistence: Mutex::default(),
        persisted: Mutex::default(),
        capacity: AtomicUsize::new(1),
    });
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let (stop, stopped) = oneshot::channel::<()>();
    let service = DenoiseWorkerServer::new(FakeService(fake.clone()));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .unwrap();
    });
    Running {
        fake,
        addr,
        stop: Some(stop),
    }
}

struct Cluster {
    coordinator: Coordinator,
    workers: Vec<Running>,
    store: SessionStore,
    pool: Arc<Pool>,
}

async fn cluster(n: usize, routing: Routing) -> Cluster {
    cluster_with(n, routing, CoordinatorSettings::default()).await
}

async fn cluster_with(n: usize, routing: Routing, settings: CoordinatorSettings) -> Cluster {
    let store = SessionStore::memory(StoreConfig::default());
    let mut workers = Vec::new();
    for _ in 0..n {
        workers.push(start(&store).await);
    }
    let pool = Arc::new(Pool::new(routing, 1000, 3));
    let addrs = workers.iter().map(|w| w.addr.clone()).collect();
    assert_eq!(pool.refresh(&WorkerSource::Static(addrs)).await, n);
    let settings = CoordinatorSettings {
        // A fake sends no heartbeats: long enough that only a scripted hang reaches it,
        // even on a busy machine.
        stall_floor: Duration::from_secs(2),
        stall_ceiling: Duration::from_secs(2),
        max_attempts: 4,
        retry_backoff: Duration::from_millis(1),
        ..settings
    };
    Cluster {
        coordinator: Coordinator::new(pool.clone(), store.clone(), settings),
        workers,
        store,
        pool,
    }
}

impl Cluster {
    fn script(&self, worker: usize, acts: &[Act]) {
        self.workers[worker]
            .fake
            .script
            .lock()
            .unwrap()
            .extend(acts.iter().copied());
    }

    fn calls(&self, worker: usize) -> usize {
        self.workers[worker].fake.calls.load(Ordering::SeqCst)
    }

    fn addr(&self, worker: usize) -> &str {
        &self.workers[worker].addr
    }

    /// The id worker `worker` gives in its Info, which blocks report.
    fn id(&self, worker: usize) -> &str {
        &self.workers[worker].fake.id
    }

    async fn generate(&self) -> Result<GenerateResponse, Status> {
        self.coordinator
            .generate(Request::new(request()))
            .await
            .map(Response::into_inner)
    }

    /// Starts a stream, waits for its first block, then until worker 0 holds a block it
    /// never answers; returns the stream and the session id.
    async fn stream_until_a_block_hangs(&self) -> (Messages, String) {
        self.script(0, &[Act::Serve, Act::Hang]);
        let response = self.coordinator.generate_stream(Request::new(request()));
        let mut stream = response.await.unwrap().into_inner();
        let first = stream.next().await.unwrap().unwrap();
        until(|| self.calls(0) == 2).await;
        (stream, first.session_id)
    }
}

type Messages = tokio_stream::wrappers::ReceiverStream<Result<GenerateStreamResponse, Status>>;

/// Five prompt tokens (one whole block), eleven new tokens, seed 5.
fn request() -> GenerateRequest {
    GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds {
            ids: vec![1, 2, 3, 4, 5],
        })),
        max_new_tokens: 11,
        seed: Some(5),
        ..Default::default()
    }
}

/// Waits until `done` holds (a deadline only against a hang: the tests wait on events).
async fn until(done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "never happened");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn workers_of(out: &GenerateResponse) -> Vec<&str> {
    out.blocks.iter().map(|b| b.worker.as_str()).collect()
}

/// The tokens of the scripted-fault tests, from a run without faults.
async fn reference_tokens() -> Vec<u32> {
    let out = cluster(1, Routing::Affinity)
        .await
        .generate()
        .await
        .unwrap();
    assert_eq!(out.token_ids.len(), 11);
    out.token_ids
}

#[tokio::test]
async fn affinity_keeps_a_session_on_one_worker_and_rotate_moves_it() {
    let c = cluster(2, Routing::Affinity).await;
    let out = c.generate().await.unwrap();
    let served = workers_of(&out);
    assert_eq!(served.len(), 4);
    assert!(served.iter().all(|w| *w == served[0]), "{served:?}");

    let c = cluster(2, Routing::Rotate).await;
    let out = c.generate().await.unwrap();
    let served = workers_of(&out);
    assert!(served.windows(2).all(|w| w[0] != w[1]), "{served:?}");
    assert_eq!(out.token_ids, reference_tokens().await);
}

/// Two workers of `capacity` blocks each, after a first generation of the test's prompt
/// (on worker 0, which then holds its prefix): the cluster and that generation.
async fn prefix_cluster(capacity: usize) -> (Cluster, GenerateResponse) {
    let c = cluster(2, Routing::Affinity).await;
    for w in &c.workers {
        w.fake.capacity.store(capacity, Ordering::SeqCst);
    }
    let addrs = c.workers.iter().map(|w| w.addr.clone()).collect();
    assert_eq!(c.pool.refresh(&WorkerSource::Static(addrs)).await, 2);
    let first = c.generate().await.unwrap();
    assert!(workers_of(&first).iter().all(|w| *w == c.id(0)));
    (c, first)
}

impl Cluster {
    /// A new session of prompt `ids` whose first block worker 0 takes and never answers;
    /// returns once worker 0 holds it.
    async fn hang_on_first(&self, ids: Vec<u32>) -> Response<Messages> {
        self.script(0, &[Act::Hang]);
        let calls = self.calls(0);
        let request = GenerateRequest {
            prompt: Some(Prompt::TokenIds(TokenIds { ids })),
            ..request()
        };
        let stream = self.coordinator.generate_stream(Request::new(request));
        let stream = stream.await.unwrap();
        until(|| self.calls(0) == calls + 1).await;
        stream
    }
}

/// A new session goes to the worker that began a session with the same prompt prefix
/// (its blocks are in that worker's prefix cache), though the other is less loaded, while
/// it has room; once it is full, a free worker wins.
#[tokio::test]
async fn new_sessions_follow_their_prompt_prefix_while_its_worker_has_room() {
    let (c, first) = prefix_cluster(2).await;
    // Worker 0 holds a block of another prompt that never ends: worker 1 is less loaded.
    let _other = c.hang_on_first(vec![9, 9, 9, 9, 9]).await;
    let follows = c.generate().await.unwrap();
    assert!(workers_of(&follows).iter().all(|w| *w == c.id(0)));
    // A second hanging session of the prompt fills worker 0.
    let _same = c.hang_on_first(vec![1, 2, 3, 4, 5]).await;
    let full = c.generate().await.unwrap();
    assert!(workers_of(&full).iter().all(|w| *w == c.id(1)));
    assert_eq!(full.token_ids, first.token_ids);
}

/// A prefix holder busier than the least loaded worker by more than a quarter of its
/// capacity (its slack) loses a new session of its prompt, though it has room.
#[tokio::test]
async fn a_prefix_holder_much_busier_than_another_loses() {
    let (c, first) = prefix_cluster(8).await;
    // Sessions of the prompt that never end on worker 0: up to two more than the least
    // loaded's none are within its slack; with three it loses.
    let mut hanging = Vec::new();
    for held in 1..=3 {
        hanging.push(c.hang_on_first(vec![1, 2, 3, 4, 5]).await);
        if held == 2 {
            let within = c.generate().await.unwrap();
            assert!(workers_of(&within).iter().all(|w| *w == c.id(0)));
        }
    }
    let elsewhere = c.generate().await.unwrap();
    assert!(workers_of(&elsewhere).iter().all(|w| *w == c.id(1)));
    assert_eq!(elsewhere.token_ids, first.token_ids);
}

#[tokio::test]
async fn a_failed_block_is_retried_on_another_worker_with_the_same_tokens() {
    let c = cluster(2, Routing::Affinity).await;
    c.script(0, &[Act::Fail(Code::Internal)]);
    c.script(1, &[Act::Serve, Act::Fail(Code::ResourceExhausted)]);
    let out = c.generate().await.unwrap();
    assert_eq!(out.token_ids, reference_tokens().await);
    let served = workers_of(&out);
    assert_eq!(served[0], c.id(1), "block 0 after worker 0 failed");
    assert_eq!(served[1], c.id(0), "block 1 after worker 1 was full");
    assert_eq!(c.calls(0) + c.calls(1), out.blocks.len() + 2);
}

#[tokio::test]
async fn a_request_fault_is_returned_without_trying_another_worker() {
    let c = cluster(2, Routing::Affinity).await;
    c.script(0, &[Act::Fail(Code::InvalidArgument)]);
    let err = c.generate().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!((c.calls(0), c.calls(1)), (1, 0));
}

#[tokio::test]
async fn a_worker_that_never_answers_times_out_and_another_serves() {
    let c = cluster(2, Routing::Affinity).await;
    c.script(0, &[Act::Hang]);
    let out = c.generate().await.unwrap();
    assert_eq!(out.token_ids, reference_tokens().await);
    assert!(workers_of(&out).iter().all(|w| *w == c.id(1)));
}

/// A worker that takes far longer than the stall wait for a block but says it is at work
/// is waited for: the block is its, and no other worker was asked.
#[tokio::test]
async fn a_slow_worker_that_makes_progress_is_not_timed_out() {
    let c = cluster(2, Routing::Affinity).await;
    c.script(0, &[Act::Serve, Act::Slow(5_000)]);
    let out = c.generate().await.unwrap();
    assert_eq!(out.token_ids, reference_tokens().await);
    assert!(workers_of(&out).iter().all(|w| *w == c.id(0)));
    assert_eq!(c.calls(1), 0);
}

#[tokio::test]
async fn attempts_run_out_with_the_last_error() {
    let c = cluster(2, Routing::Affinity).await;
    let failures = [Act::Fail(Code::Unavailable); 8];
    c.script(0, &failures);
    c.script(1, &failures);
    let err = c.generate().await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(c.calls(0) + c.calls(1), 4, "max_attempts");
}

/// The store loses the session between blocks: the coordinator puts back the record it
/// holds and the generation ends with the tokens it would have had.
#[tokio::test]
async fn a_session_lost_by_the_store_is_restored_from_the_request() {
    let c = cluster(1, Routing::Affinity).await;
    c.script(0, &[Act::Serve, Act::Flush]);
    let out = c.generate().await.unwrap();
    assert_eq!(out.token_ids, reference_tokens().await);
    let record = c.store.get_session("fake", &out.session_id).await.unwrap();
    let record = record.expect("restored");
    assert_eq!(record.committed_blocks, 4);
    assert_eq!(&record.tokens[..5], &[1, 2, 3, 4, 5]);
}

/// A worker whose server has gone is marked down by the failed call itself (the
/// transport error), and the block is served elsewhere.
#[tokio::test]
async fn an_unreachable_worker_is_marked_down_and_skipped() {
    let mut c = cluster(2, Routing::Affinity).await;
    let _ = c.workers[0].stop.take().unwrap().send(());
    // The server is gone once its port refuses connections.
    while tokio::net::TcpStream::connect(c.addr(0)).await.is_ok() {
        tokio::task::yield_now().await;
    }
    let out = c.generate().await.unwrap();
    assert!(workers_of(&out).iter().all(|w| *w == c.id(1)));
    assert_eq!(c.pool.healthy_count(), 1);
}

/// A client that goes away mid-block: the coordinator drops the block at once, which
/// cancels the worker's call (and so its compute), instead of waiting for the answer.
#[tokio::test]
async fn a_client_that_goes_away_cancels_the_block_in_flight() {
    let c = cluster(1, Routing::Affinity).await;
    let (stream, _) = c.stream_until_a_block_hangs().await;
    drop(stream);
    until(|| c.workers[0].fake.dropped.load(Ordering::SeqCst) == 1).await;
}

/// DeleteSession stops the session's generation mid-block, then deletes it: the stream
/// ends as cancelled and nothing writes the session back.
#[tokio::test]
async fn delete_session_stops_its_generation_first() {
    let c = cluster(1, Routing::Affinity).await;
    let (mut stream, session_id) = c.stream_until_a_block_hangs().await;
    let request = Request::new(DeleteSessionRequest {
        session_id: session_id.clone(),
    });
    let deleted = c.coordinator.delete_session(request).await.unwrap();
    assert!(deleted.into_inner().deleted);
    until(|| c.workers[0].fake.dropped.load(Ordering::SeqCst) == 1).await;
    let mut last = None;
    while let Some(message) = stream.next().await {
        last = Some(message.unwrap());
    }
    assert_eq!(last.unwrap().stop_reason, StopReason::Cancelled as i32);
    assert_eq!(
        c.store.get_session("fake", &session_id).await.unwrap(),
        None
    );
}

/// The queue is bounded for new requests only: while one generation holds the only slot
/// and another waits, a third request is refused before any token; the waiting one goes on
/// when the slot frees up, and reports how long it queued.
#[tokio::test]
async fn beyond_the_queue_bound_new_requests_are_refused_and_the_admitted_wait() {
    let settings = CoordinatorSettings {
        max_queue: 1,
        ..CoordinatorSettings::default()
    };
    let c = cluster_with(1, Routing::Affinity, settings).await;
    let (holder, _) = c.stream_until_a_block_hangs().await;
    let waiting = c.coordinator.generate_stream(Request::new(request()));
    let mut waiting = waiting.await.unwrap().into_inner();
    until(|| c.coordinator.queued_blocks() == 1).await;
    let refused = c.generate().await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    drop(holder);
    let first = waiting.next().await.unwrap().unwrap();
    assert!(first.block.unwrap().queue_ms > 0.0);
    let mut tokens = first.token_ids;
    while let Some(message) = waiting.next().await {
        tokens.extend(message.unwrap().token_ids);
    }
    assert_eq!(tokens, reference_tokens().await);
}

/// Many more generations than the worker's capacity: every one finishes with its own
/// tokens, and the worker never has more blocks than its capacity at once.
#[tokio::test]
async fn streams_beyond_the_capacity_wait_their_turn_and_all_finish() {
    let c = cluster(1, Routing::Affinity).await;
    let expected = reference_tokens().await;
    let runs = (0..48).map(|_| c.generate());
    for out in futures::future::join_all(runs).await {
        assert_eq!(out.unwrap().token_ids, expected);
    }
    assert_eq!(c.workers[0].fake.most_active.load(Ordering::SeqCst), 1);
}

/// A worker busy with another coordinator's blocks is waited for: load never uses up the
/// attempts that faults do.
#[tokio::test]
async fn a_busy_worker_is_waited_for_not_failed() {
    let c = cluster(1, Routing::Affinity).await;
    c.script(0, &[Act::Fail(Code::ResourceExhausted); 10]);
    let out = c.generate().await.unwrap();
    assert_eq!(out.token_ids, reference_tokens().await);
    assert_eq!(c.calls(0), out.blocks.len() + 10);
}

/// Every block carries its generation's KV persistence (the request's, else the
/// deployment's); under at-end the last block's worker is asked once, when the generation
/// ends, to write the window at the final block count; an unknown value is refused naming
/// the field.
#[tokio::test]
async fn kv_persistence_reaches_the_workers_and_at_end_asks_the_last_one() {
    let settings = CoordinatorSettings {
        kv_persistence: Persistence::AtEnd,
        ..CoordinatorSettings::default()
    };
    let c = cluster_with(1, Routing::Affinity, settings).await;
    let fake = &c.workers[0].fake;
    let first = c.generate().await.unwrap();
    let record = c
        .store
        .get_session("fake", &first.session_id)
        .await
        .unwrap();
    let committed = record.unwrap().committed_blocks as u32;
    let at_end = KvPersistence::AtEnd as i32;
    assert!(
        fake.persistence
            .lock()
            .unwrap()
            .iter()
            .all(|&p| p == at_end)
    );
    assert_eq!(*fake.persisted.lock().unwrap(), [committed]);

    let asked = fake.persistence.lock().unwrap().len();
    let never = GenerateRequest {
        kv_persistence: KvPersistence::Never as i32,
        ..request()
    };
    c.coordinator.generate(Request::new(never)).await.unwrap();
    let seen = fake.persistence.lock().unwrap()[asked..].to_vec();
    assert!(!seen.is_empty() && seen.iter().all(|&p| p == KvPersistence::Never as i32));
    assert_eq!(fake.persisted.lock().unwrap().len(), 1);

    let unknown = GenerateRequest {
        kv_persistence: 9,
        ..request()
    };
    let status = c
        .coordinator
        .generate(Request::new(unknown))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("kv_persistence"),
        "{}",
        status.message()
    );
}
