//! Credentials end to end through the real binaries: the public API's keys (missing,
//! wrong, another key's session, reloaded on SIGHUP) and the workers' internal token.

use std::time::{Duration, Instant};

use bd3lm_proto::auth::Bearer;
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

        std::fs::write(cluster.dir().join("api-keys"), API_KEYS[1]).unwrap();
        cluster.coordinator.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(10);
        let refused =
            |r: Result<_, tonic::Status>| r.err().map(|s| s.code()) == Some(Code::Unauthenticated);
        while !refused(alpha.get_session(get(&id)).await) {
            assert!(Instant::now() < deadline, "the removed key still works");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        beta.generate(request(None, vec![1022], 4)).await.unwrap();
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
