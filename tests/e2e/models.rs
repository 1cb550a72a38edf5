//! One deployment serving several models by name: workers of two checkpoints behind one
//! coordinator, each request routed to the workers of the model it names.

use std::path::Path;
use std::time::{Duration, Instant};

use bd3lm_proto::v1::generate_request::Prompt;
use bd3lm_proto::v1::generation_client::GenerationClient;
use bd3lm_proto::v1::{GenerateRequest, GetSessionRequest, ListServedModelsRequest, TokenIds};
use tonic::Code;
use tonic::transport::Channel;

use crate::cluster::{Generated, Proc, Redis, free_port, spawn, start_coordinator};
use crate::distributed::checkpoint;
use crate::{bd3lm, bin};

/// The bundled demo model's weights (vocabulary 8,193; beside the reference model's
/// 1,024) in `dir`, without its tokenizer: generations print token ids.
fn demo(dir: &Path) -> std::path::PathBuf {
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("../services/bd3lm/demo-model");
    let copy = dir.join("demo");
    std::fs::create_dir_all(&copy).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(bundled.join(file), copy.join(file)).unwrap();
    }
    copy
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
    let ids = "7,9,11";
    let ckpt = checkpoint.to_str().unwrap();
    let args = [
        "generate",
        "--checkpoint",
        ckpt,
        "--prompt-ids",
        ids,
        "--max-tokens",
        "12",
        "--seed",
        "5",
    ];
    let out = Generated::from(bd3lm(&args));
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.ids
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
