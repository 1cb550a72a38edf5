//! One deployment serving several models by name: workers of two checkpoints behind one
//! coordinator, each request routed to the workers of the model it names.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bd3lm_proto::v1::generate_request::Prompt;
use bd3lm_proto::v1::generation_client::GenerationClient;
use bd3lm_proto::v1::{GenerateRequest, GetSessionRequest, ListServedModelsRequest, TokenIds};
use tonic::Code;
use tonic::transport::Channel;

use crate::cluster::{Proc, Redis, free_port, spawn, start_coordinator};
use crate::distributed::checkpoint;
use crate::{bin, jobs};

/// The bundled demo model's weights (vocabulary 8,193; beside the reference model's
/// 1,024) in `dir`, without its tokenizer: generations print token ids.
fn demo(dir: &Path) -> PathBuf {
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("../services/bd3lm/demo-model");
    weights_only(&bundled, &dir.join("demo"))
}

/// The weights and configuration of checkpoint `from`, copied to `to` without a
/// tokenizer (so that a local generation prints token ids).
fn weights_only(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
    to.to_path_buf()
}

/// A worker of `checkpoint` serving it as `id` on the store of `store` flags.
fn worker(dir: &Path, checkpoint: &Path, id: &str, store: &[String]) -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--addr".to_string(),
        addr.clone(),
        "--checkpoint".into(),
        checkpoint.display().to_string(),
        "--model-id".into(),
        id.into(),
    ];
    args.extend(store.iter().cloned());
    (spawn(&bin("bd3lm-worker"), &args, dir, id), addr)
}

/// Token ids valid in both vocabularies.
const PROMPT: [u32; 3] = [7, 9, 11];

fn request(model: &str, session: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds {
            ids: PROMPT.to_vec(),
        })),
        model: model.into(),
        session_id: session.into(),
        max_new_tokens: 12,
        seed: Some(5),
        ..Default::default()
    }
}

/// The same generation in one process with `checkpoint`.
fn local(checkpoint: &Path) -> Vec<u32> {
    local_of(checkpoint, "7,9,11")
}

/// A local generation of 12 tokens after `ids` with seed 5.
fn local_of(checkpoint: &Path, ids: &str) -> Vec<u32> {
    let args = ["--prompt-ids", ids, "--max-tokens", "12", "--seed", "5"];
    crate::distributed::local_with(checkpoint, &args)
}

async fn client(addr: &str) -> GenerationClient<Channel> {
    GenerationClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// Waits until the coordinator at `addr` has both models ready.
async fn until_both_ready(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let served = client(addr)
            .await
            .list_served_models(ListServedModelsRequest {})
            .await
            .unwrap()
            .into_inner()
            .models;
        if served.len() == 2 && served.iter().all(|m| m.ready_workers == 1) {
            assert_eq!(
                (served[0].id.as_str(), served[1].id.as_str()),
                ("demo", "ref")
            );
            assert_eq!((served[0].block_size, served[1].block_size), (4, 4));
            return;
        }
        assert!(Instant::now() < deadline, "{served:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two models behind one coordinator: each request's tokens are those of the model it
/// names (a local generation of that checkpoint with the same seed), a session continues
/// on its model and says which; naming none is INVALID_ARGUMENT naming `model` while two
/// are served without a default, and served by `--default-model` with one; an unknown
/// model is NOT_FOUND naming `model`.
#[test]
fn one_deployment_serves_two_models_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let redis = Redis::start(root);
    let store = redis.flags();
    let (_ref_worker, ref_addr) = worker(root, &checkpoint(), "ref", &store);
    let demo = demo(root);
    let (_demo_worker, demo_addr) = worker(root, &demo, "demo", &store);
    let workers = [ref_addr, demo_addr];
    let (_coordinator, addr) = start_coordinator(root, &workers, &store, "affinity", &[]);
    let default = ["--default-model", "ref"];
    let (_defaulted, default_addr) =
        start_coordinator(root, &workers, &store, "affinity", &default);
    let expected = [("ref", local(&checkpoint())), ("demo", local(&demo))];
    assert_ne!(expected[0].1, expected[1].1, "the two models differ");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        until_both_ready(&addr).await;
        let mut generation = client(&addr).await;
        for (model, tokens) in &expected {
            let out = generation
                .generate(request(model, ""))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(&out.token_ids, tokens, "{model}");
            let more = request(model, &out.session_id);
            let continued = generation.generate(more).await.unwrap().into_inner();
            assert_eq!(continued.session_id, out.session_id);
            let info = GetSessionRequest {
                session_id: out.session_id,
            };
            let info = generation.get_session(info).await.unwrap().into_inner();
            assert_eq!(&info.model_id, model);
            let began = [&PROMPT[..], tokens].concat();
            assert!(info.token_ids.starts_with(&began), "{:?}", info.token_ids);
            assert!(info.token_ids.len() >= began.len() + 12);
        }
        let unnamed = generation.generate(request("", "")).await.unwrap_err();
        assert_eq!(unnamed.code(), Code::InvalidArgument, "{unnamed}");
        assert!(unnamed.message().starts_with("model:"), "{unnamed}");
        let unknown = generation.generate(request("nope", "")).await.unwrap_err();
        assert_eq!(unknown.code(), Code::NotFound, "{unknown}");
        assert!(unknown.message().starts_with("model:"), "{unknown}");

        until_both_ready(&default_addr).await;
        let mut defaulted = client(&default_addr).await;
        let out = defaulted
            .generate(request("", ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(out.token_ids, expected[0].1, "the default model");
    });
}

/// `bd3lm serve --model tiny` serves the demo model and, once a job publishes `tiny`,
/// that model by name beside it (the tokens of its published checkpoint), while requests
/// naming no model keep the demo model's tokens.
#[test]
fn serve_serves_a_published_model_by_name_beside_the_demo() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let data = jobs::shards(root);
    let addr = format!("127.0.0.1:{}", free_port());
    let training = root.join("training");
    let args: Vec<String> = [
        "serve",
        "--addr",
        &addr,
        "--model",
        "tiny",
        "--training-dir",
        training.to_str().unwrap(),
        "--training-data-root",
        root.to_str().unwrap(),
        "--registry-poll-secs",
        "0.2",
    ]
    .map(String::from)
    .to_vec();
    let _serve = spawn(&bin("bd3lm"), &args, root, "serve");
    let ids = [10, 0, 1];
    let tiny_request = |model: &str| GenerateRequest {
        prompt: Some(Prompt::TokenIds(TokenIds { ids: ids.to_vec() })),
        model: model.into(),
        max_new_tokens: 12,
        seed: Some(5),
        ..Default::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let minute = Duration::from_secs(60);
        jobs::wait_serving(&addr, minute).await;
        let mut generation = client(&addr).await;
        let before = generation
            .generate(tiny_request(""))
            .await
            .unwrap()
            .into_inner();
        let steps = [&jobs::RUN[..jobs::RUN.len() - 2], &["--steps", "20"]].concat();
        let id = jobs::submit_detached(&addr, "tiny", &data, &steps);
        let mut trainings = jobs::training(&addr).await;
        let done = jobs::wait_job(&mut trainings, &id, Duration::from_secs(300), |j| {
            j.state != bd3lm_proto::v1::JobState::Queued as i32
                && j.state != bd3lm_proto::v1::JobState::Running as i32
        })
        .await;
        assert_eq!(done.published_versions, vec![1], "{}", done.error);
        let deadline = Instant::now() + minute;
        loop {
            let served = generation
                .list_served_models(ListServedModelsRequest {})
                .await;
            let served = served.unwrap().into_inner().models;
            if served.iter().any(|m| m.id == "tiny" && m.ready_workers > 0) {
                break;
            }
            assert!(Instant::now() < deadline, "{served:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let tiny = generation
            .generate(tiny_request("tiny"))
            .await
            .unwrap()
            .into_inner();
        let published = training.join("registry").join("tiny").join("1");
        let weights = weights_only(&published, &root.join("tiny-weights"));
        assert_eq!(tiny.token_ids, local_of(&weights, "10,0,1"));
        let after = generation
            .generate(tiny_request(""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            after.token_ids, before.token_ids,
            "the default stays the demo model"
        );
    });
}
