//! Credentials end to end through the real binaries: the public API's keys (missing,
//! wrong, another key's session, reloaded on SIGHUP) and the workers' internal token.

use std::time::{Duration, Instant};

use bd3lm_kvstore::{RedisConnection, RedisSecrets, SessionStore, StoreConfig};
use bd3lm_proto::auth::Bearer;
use bd3lm_proto::tls::TlsFiles;
use bd3lm_proto::v1::denoise_worker_client::DenoiseWorkerClient;
use bd3lm_proto::v1::generation_client::GenerationClient;
use bd3lm_proto::v1::{DeleteSessionRequest, DenoiseBlockRequest, GetSessionRequest, InfoRequest};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::cluster::{API_KEYS, Cluster, INTERNAL_TOKEN};
use crate::distributed::checkpoint;
use crate::integrity::{request, runtime};

type Client = GenerationClient<InterceptedService<Channel, Bearer>>;

async fn channel(addr: &str) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn with_key(channel: &Channel, key: Option<&str>) -> Client {
    GenerationClient::with_interceptor(channel.clone(), Bearer::new(key).unwrap())
}

fn get(id: &str) -> GetSessionRequest {
    GetSessionRequest {
        session_id: id.into(),
    }
}

/// Calls without a valid key are UNAUTHENTICATED; a session belongs to the key that
/// created it (another key is told it does not exist); a key removed from the file is
/// refused once the coordinator got SIGHUP. No key reaches a log.
#[test]
fn api_keys_guard_the_api_and_sessions_belong_to_their_key() {
    let cluster = Cluster::start_secured(&checkpoint(), 1);
    runtime().block_on(async {
        let channel = channel(&cluster.addr).await;
        for key in [None, Some("key-gamma-000")] {
            let refused = with_key(&channel, key)
                .generate(request(None, vec![1022], 4))
                .await;
            let status = refused.unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{status}");
            assert!(status.message().starts_with("authorization"), "{status}");
        }
        let (mut alpha, mut beta) = (
            with_key(&channel, Some(API_KEYS[0])),
            with_key(&channel, Some(API_KEYS[1])),
        );
        let id = alpha
            .generate(request(None, vec![1022, 7], 8))
            .await
            .unwrap()
            .into_inner()
            .session_id;
        assert_eq!(
            beta.get_session(get(&id)).await.unwrap_err().code(),
            Code::NotFound
        );
        let stolen = beta.generate(request(Some(&id), vec![5], 4)).await;
        assert_eq!(stolen.unwrap_err().code(), Code::NotFound);
        let delete = DeleteSessionRequest {
            session_id: id.clone(),
        };
        assert!(
            !beta
                .delete_session(delete)
                .await
                .unwrap()
                .into_inner()
                .deleted
        );
        alpha
            .generate(request(Some(&id), vec![5], 4))
            .await
            .unwrap();
        assert!(alpha.get_session(get(&id)).await.is_ok());

        // Beta's live sessions stop at the cluster's limit of 4, until one is deleted.
        let mut betas = Vec::new();
        for _ in 0..4 {
            let out = beta.generate(request(None, vec![1022], 4)).await.unwrap();
            betas.push(out.into_inner().session_id);
        }
        let over = beta
            .generate(request(None, vec![1022], 4))
            .await
            .unwrap_err();
        assert_eq!(over.code(), Code::ResourceExhausted, "{over}");
        assert!(over.message().starts_with("session_id"), "{over}");
        let delete = DeleteSessionRequest {
            session_id: betas[0].clone(),
        };
        assert!(
            beta.delete_session(delete)
                .await
                .unwrap()
                .into_inner()
                .deleted
        );
        beta.generate(request(None, vec![1022], 4)).await.unwrap();

        std::fs::write(cluster.dir().join("api-keys"), API_KEYS[1]).unwrap();
        cluster.coordinator.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(10);
        let refused =
            |r: Result<_, tonic::Status>| r.err().map(|s| s.code()) == Some(Code::Unauthenticated);
        while !refused(alpha.get_session(get(&id)).await) {
            assert!(Instant::now() < deadline, "the removed key still works");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        beta.get_session(get(&betas[1])).await.unwrap();
    });
    let log = cluster.coordinator.log();
    for key in API_KEYS {
        assert!(!log.contains(key), "a key in the log: {log}");
    }
    assert!(log.contains("API keys reloaded"), "{log}");
}

/// A worker serves only calls that carry the internal token; its health stays open for
/// probes.
#[test]
fn workers_refuse_calls_without_the_internal_token() {
    let cluster = Cluster::start_secured(&checkpoint(), 1);
    runtime().block_on(async {
        let channel = channel(&cluster.worker_addrs[0]).await;
        for token in [None, Some("not-the-token")] {
            let mut worker =
                DenoiseWorkerClient::with_interceptor(channel.clone(), Bearer::new(token).unwrap());
            assert_eq!(
                worker.info(InfoRequest {}).await.unwrap_err().code(),
                Code::Unauthenticated
            );
            let block = DenoiseBlockRequest {
                session_id: format!("{:032x}", 1),
                block_index: 0,
                ..Default::default()
            };
            assert_eq!(
                worker.denoise_block(block).await.unwrap_err().code(),
                Code::Unauthenticated
            );
        }
        let bearer = Bearer::new(Some(INTERNAL_TOKEN)).unwrap();
        let mut worker = DenoiseWorkerClient::with_interceptor(channel.clone(), bearer);
        assert!(worker.info(InfoRequest {}).await.is_ok());
    });
    assert!(cluster.worker_ready(0), "health is open");
    assert!(!cluster.workers[0].log().contains(INTERNAL_TOKEN));
}

/// Whether a call through `files`' TLS (plain text without a CA) to `addr`, named
/// `name`, is refused: at the handshake or at the call.
async fn refused(addr: &str, name: &str, files: &TlsFiles) -> bool {
    let tls = files.client(name).unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).unwrap();
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    let Ok(channel) = endpoint.connect().await else {
        return true;
    };
    let bearer = Bearer::new(Some(INTERNAL_TOKEN)).unwrap();
    let mut worker = DenoiseWorkerClient::with_interceptor(channel, bearer);
    worker.info(InfoRequest {}).await.is_err()
}

/// TLS everywhere: generations go through (the client verifies the coordinator, the
/// coordinator and the workers verify each other); plain text is refused on both ports;
/// a worker refuses a caller without a client certificate, or with one another CA signed.
#[test]
fn tls_ports_refuse_plain_text_and_workers_require_a_known_client_certificate() {
    let cluster = Cluster::start_tls(&checkpoint(), 1);
    let args = [
        "--prompt-ids",
        "1022,7",
        "--max-tokens",
        "12",
        "--seed",
        "5",
    ];
    let out = cluster.generate(&args);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.ids, crate::distributed::local(&args));
    let file = |name: &str| Some(cluster.dir().join(name));
    let ca = file("ca.pem");
    let coordinator = TlsFiles {
        cert: file("coordinator.pem"),
        key: file("coordinator.key"),
        ca: ca.clone(),
        client_ca: None,
    };
    let stranger = TlsFiles {
        cert: file("stranger.pem"),
        key: file("stranger.key"),
        ..coordinator.clone()
    };
    let anonymous = TlsFiles {
        ca: ca.clone(),
        ..TlsFiles::default()
    };
    runtime().block_on(async {
        let worker = &cluster.worker_addrs[0];
        assert!(
            !refused(worker, "bd3lm-worker", &coordinator).await,
            "the coordinator's certificate"
        );
        assert!(
            refused(worker, "bd3lm-worker", &anonymous).await,
            "no client certificate"
        );
        assert!(
            refused(worker, "bd3lm-worker", &stranger).await,
            "another CA's certificate"
        );
        assert!(
            refused(worker, "bd3lm-worker", &TlsFiles::default()).await,
            "plain text"
        );
        assert!(
            refused(&cluster.addr, "127.0.0.1", &TlsFiles::default()).await,
            "plain text"
        );
    });
}

/// The store over `rediss://`: the server's certificate verified against a given CA, the
/// password kept out of the URL. The store contract holds; without the CA, or with a wrong
/// password, the store does not answer.
#[test]
fn the_store_speaks_tls_to_redis_with_the_password_apart() {
    let dir = tempfile::tempdir().unwrap();
    let tls_port = crate::cluster::free_port();
    let _redis = crate::cluster::Redis::start_tls(dir.path(), tls_port, "pw-7c1f-test");
    let url = format!("rediss://127.0.0.1:{tls_port}/0");
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let secrets = |password: &str, ca: Option<&Vec<u8>>| RedisSecrets {
        password: Some(password.into()),
        ca_pem: ca.cloned(),
    };
    runtime().block_on(async {
        let redis = RedisConnection::open(&url, secrets("pw-7c1f-test", Some(&ca))).unwrap();
        bd3lm_kvstore::contract::check(SessionStore::redis(&redis, StoreConfig::default())).await;
        let unknown_ca = RedisConnection::open(&url, secrets("pw-7c1f-test", None)).unwrap();
        assert!(
            unknown_ca.ping().await.is_err(),
            "a certificate of an unknown CA was accepted"
        );
        let wrong = RedisConnection::open(&url, secrets("wrong", Some(&ca))).unwrap();
        let err = wrong.ping().await.unwrap_err().to_string();
        assert!(!err.contains("pw-7c1f-test"), "{err}");
    });
}

/// gRPC reflection on the public port answers to the API's keys only: without one it is
/// UNAUTHENTICATED, with one it lists the services.
#[test]
fn reflection_is_behind_the_api_keys() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let cluster = Cluster::start_secured(&checkpoint(), 1);
    runtime().block_on(async {
        let channel = channel(&cluster.addr).await;
        let list = || {
            futures::stream::iter([ServerReflectionRequest {
                message_request: Some(MessageRequest::ListServices(String::new())),
                ..Default::default()
            }])
        };
        for key in [None, Some(API_KEYS[0])] {
            let bearer = Bearer::new(key).unwrap();
            let mut client = ServerReflectionClient::with_interceptor(channel.clone(), bearer);
            let answer = client.server_reflection_info(list()).await;
            let Some(_) = key else {
                assert_eq!(answer.unwrap_err().code(), Code::Unauthenticated);
                continue;
            };
            let mut stream = answer.unwrap().into_inner();
            let message = stream.message().await.unwrap().unwrap();
            let Some(MessageResponse::ListServicesResponse(services)) = message.message_response
            else {
                panic!("{message:?}");
            };
            let names: Vec<String> = services.service.into_iter().map(|s| s.name).collect();
            assert!(
                names.contains(&"bd3lm.v1.Generation".to_string()),
                "{names:?}"
            );
        }
    });
}

/// A key file holding a key shorter than 16 characters is refused at start-up, in one
/// line naming the file's line and the minimum.
#[test]
fn a_short_api_key_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("{}\nshort-key\n", API_KEYS[0])).unwrap();
    let keys = keys.display().to_string();
    let serve = [
        "serve",
        "--api-keys",
        keys.as_str(),
        "--addr",
        "127.0.0.1:0",
    ];
    let out = crate::bd3lm(&serve);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("line 2") && stderr.contains("at least 16"),
        "{stderr}"
    );
    assert!(!stderr.contains("short-key"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// A worker without an internal token refuses to listen on an address other machines
/// reach, unless told to with --insecure-no-internal-token; on loopback it serves.
#[test]
fn a_worker_without_a_token_refuses_a_non_loopback_address() {
    let dir = tempfile::tempdir().unwrap();
    let redis = crate::cluster::Redis::start(dir.path());
    let url = redis.url();
    let checkpoint = checkpoint().display().to_string();
    let worker = |addr: &str, extra: &[&str]| {
        std::process::Command::new(crate::bin("bd3lm-worker"))
            .args(["--addr", addr, "--checkpoint", &checkpoint, "--redis", &url])
            .args(extra)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let refused = worker("0.0.0.0:0", &[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--internal-token-file is required"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("listening"),
        "refused before it listens: {stderr}"
    );

    let served = [
        ("127.0.0.1:0", &[][..]),
        ("0.0.0.0:0", &["--insecure-no-internal-token"][..]),
    ];
    for (i, (addr, extra)) in served.into_iter().enumerate() {
        let args: Vec<String> = ["--addr", addr, "--checkpoint", &checkpoint, "--redis", &url]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        // `spawn` returns once the worker printed that it listens.
        let name = format!("worker{i}");
        crate::cluster::spawn(&crate::bin("bd3lm-worker"), &args, dir.path(), &name);
    }
}

/// New-session requests refused once their model is known (here: a threshold without the
/// confidence sampler) leave their key's count of live sessions as it was: after 2,000
/// of them the key still creates sessions up to its limit of 4, and is refused past it.
#[test]
fn refused_new_sessions_leave_the_keys_count_as_it_was() {
    use bd3lm_proto::v1::SamplingParameters;
    use futures::StreamExt;

    let cluster = Cluster::start_secured(&checkpoint(), 1);
    let counted = || {
        let owner = cluster.redis.keys("*:owner:*");
        owner
            .iter()
            .map(|k| cluster.redis.integer(&[b"ZCARD", k.as_bytes()]))
            .sum::<i64>()
    };
    let before = counted();
    runtime().block_on(async {
        let channel = channel(&cluster.addr).await;
        let mut client = with_key(&channel, Some(API_KEYS[0]));
        let mut refused = request(None, vec![1022, 7], 4);
        refused.sampling = Some(SamplingParameters {
            threshold: Some(0.5),
            ..Default::default()
        });
        let calls = (0..2_000).map(|_| {
            let (mut client, refused) = (client.clone(), refused.clone());
            async move { client.generate(refused).await }
        });
        let answers: Vec<_> = futures::stream::iter(calls)
            .buffer_unordered(32)
            .collect()
            .await;
        for answer in answers {
            let status = answer.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{status}");
        }
        assert_eq!(counted(), before, "no refused request is counted");
        for i in before..4 {
            let prompt = vec![1022, i as u32];
            client.generate(request(None, prompt, 4)).await.unwrap();
        }
        let past = client
            .generate(request(None, vec![1022], 4))
            .await
            .unwrap_err();
        assert_eq!(past.code(), Code::ResourceExhausted, "{past}");
    });
}

/// One key's burst does not starve another key: with a worker that takes 2 blocks at once
/// and 24 streams of one key queued for it, a second key's stream gets its first block
/// after at most a few of the burst's blocks (the keys take turns at the slots; 3 here),
/// where first come, first served would put it behind all the queued ones (24 here). A key is held to
/// `--max-streams-per-key` (RESOURCE_EXHAUSTED), and a first block that waits past
/// `--max-queue-wait-secs` ends before any token.
#[test]
fn keys_take_turns_at_the_workers_and_are_held_to_their_limits() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let cluster = Cluster::start_secured_with(
        &checkpoint(),
        1,
        &[
            "--max-sessions-per-key",
            "100",
            "--max-streams-per-key",
            "24",
            "--max-queue-wait-secs",
            "60",
        ],
        &["--max-batch", "2"],
    );
    runtime().block_on(async {
        let channel = channel(&cluster.addr).await;
        let (burst, small) = (
            with_key(&channel, Some(API_KEYS[0])),
            with_key(&channel, Some(API_KEYS[1])),
        );
        let delivered = Arc::new(AtomicUsize::new(0));
        let mut streams = Vec::new();
        for i in 0..24u32 {
            let (mut client, delivered) = (burst.clone(), delivered.clone());
            streams.push(tokio::spawn(async move {
                let request = request(None, vec![1022, i], 200);
                let mut stream = client.generate_stream(request).await.unwrap().into_inner();
                while let Some(message) = stream.message().await.unwrap() {
                    if message.block.is_some() {
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        // The burst is under way and its blocks queue for the worker's 2 slots.
        while delivered.load(Ordering::Relaxed) < 24 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let over = burst
            .clone()
            .generate(request(None, vec![1022], 4))
            .await
            .unwrap_err();
        assert_eq!(over.code(), Code::ResourceExhausted, "{over}");
        assert!(over.message().contains("API key"), "{over}");

        let before = delivered.load(Ordering::Relaxed);
        let mut stream = small
            .clone()
            .generate_stream(request(None, vec![1022, 99], 8))
            .await
            .unwrap()
            .into_inner();
        loop {
            let message = stream.message().await.unwrap().unwrap();
            if message.block.is_some() {
                break;
            }
        }
        let overtaken = delivered.load(Ordering::Relaxed) - before;
        assert!(
            overtaken <= 10,
            "the small key's first block came after {overtaken} of the burst's"
        );
        for s in streams {
            s.await.unwrap();
        }
    });
}

/// A new generation whose first block waits for a worker slot past
/// `--max-queue-wait-secs` ends with RESOURCE_EXHAUSTED before any token: the only worker
/// is stopped (SIGSTOP) and the coordinator has taken it out of service, so there is no
/// slot to wait for.
#[test]
fn a_first_block_that_waits_past_the_queue_limit_ends_before_any_token() {
    let cluster =
        Cluster::start_secured_with(&checkpoint(), 1, &["--max-queue-wait-secs", "0.5"], &[]);
    cluster.workers[0].signal("STOP");
    assert!(
        cluster.wait_ready_is(false, Duration::from_secs(60)),
        "the coordinator never took the stopped worker out"
    );
    runtime().block_on(async {
        let channel = channel(&cluster.addr).await;
        let mut waiter = with_key(&channel, Some(API_KEYS[1]));
        let mut stream = waiter
            .generate_stream(request(None, vec![1022, 5], 8))
            .await
            .unwrap()
            .into_inner();
        let ended = loop {
            match stream.message().await {
                Ok(Some(m)) => assert!(m.token_ids.is_empty(), "a token came first"),
                Ok(None) => panic!("the stream ended without an error"),
                Err(status) => break status,
            }
        };
        assert_eq!(ended.code(), Code::ResourceExhausted, "{ended}");
        assert!(ended.message().contains("waited its limit"), "{ended}");
    });
    cluster.workers[0].signal("CONT");
}

/// One HTTP/1.1 GET of `path` from `addr` over TLS verified against the CA in `ca` (the
/// server named 127.0.0.1), with `key` as the bearer: the whole response.
async fn https_get(addr: &str, ca: &str, path: &str, key: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto};
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    tls.read_to_string(&mut response).await?;
    Ok(response)
}

/// The HTTP API takes the gRPC port's TLS and API keys: over HTTPS verified against the
/// CA it lists the model with a key and answers 401 without one; plain HTTP gets no
/// answer.
#[test]
fn the_http_api_speaks_the_grpc_ports_tls_under_the_same_keys() {
    let http = format!("127.0.0.1:{}", crate::cluster::free_port());
    let cluster = Cluster::start_tls_with(&checkpoint(), 1, &["--http-addr", &http]);
    let ca = cluster.dir().join("ca.pem").display().to_string();
    let key = cluster.api_key.clone().unwrap();
    runtime().block_on(async {
        let deadline = Instant::now() + Duration::from_secs(120);
        let listed = loop {
            // Until the worker's model is known (503 before), or the port opens.
            match https_get(&http, &ca, "/v1/models", &key).await {
                Ok(r) if r.starts_with("HTTP/1.1 200") => break r,
                other => assert!(Instant::now() < deadline, "{other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(listed.contains("\"object\":\"list\""), "{listed}");
        let refused = https_get(&http, &ca, "/v1/models", "not-a-key-0123456789")
            .await
            .unwrap();
        assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
        assert!(refused.contains("authentication_error"), "{refused}");

        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut plain = tokio::net::TcpStream::connect(&http).await.unwrap();
        let request = "GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        plain.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = plain.read_to_end(&mut answer).await;
        assert!(!answer.starts_with(b"HTTP/"), "plain HTTP was answered");
    });
}
