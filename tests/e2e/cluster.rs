//! Real processes for the distributed tests: a `redis-server` on a free loopback port, the
//! `bd3lm-worker` and `bd3lm-coordinator` binaries, and the `bd3lm` client.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::time::{Duration, Instant};

use bd3lm_proto::v1::denoise_worker_client::DenoiseWorkerClient;
use bd3lm_proto::v1::generation_client::GenerationClient;
use bd3lm_proto::v1::{GenerateRequest, GenerateResponse, InfoRequest, InfoResponse};
use tonic::Status;

use crate::bin;

/// A free loopback port for a server of a test (see [`quiet_port`]).
pub fn free_port() -> u16 {
    quiet_port(false)
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    /// Kept open so the process never writes to a closed pipe.
    _stdout: Option<BufReader<std::process::ChildStdout>>,
}

impl Proc {
    /// Kills the process now (SIGKILL: no chance to finish its work).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM (what Kubernetes sends first) and waits up to `within` for the
    /// process to exit; its exit code, or `None` when it is still running.
    pub fn terminate(&mut self, within: Duration) -> Option<i32> {
        self.signal("TERM");
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Sends the signal named `name` (`HUP`, `TERM`, `STOP`, ...).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args([format!("-{name}").as_str(), pid.as_str()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{name} {pid}");
    }

    /// What it wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `program` with its stderr in `dir`, and waits for the line on stdout that says it
/// listens.
pub fn spawn(program: &Path, args: &[String], dir: &Path, name: &str) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let mut child = Command::new(program)
        .args(args)
        .env("BD3LM_THREADS", "1")
        .env("RAYON_NUM_THREADS", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(
        line.contains("listening"),
        "{name} did not start: {line} {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    Proc {
        child,
        log,
        _stdout: Some(stdout),
    }
}

/// A `redis-server` of this test alone.
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    proc: Option<Proc>,
    /// Flags beyond the defaults.
    extra: Vec<String>,
}

impl Redis {
    /// Starts a server on a free port with its files in `dir`.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, Vec::new())
    }

    /// [`Redis::start`] with `extra` flags of `redis-server`.
    pub fn start_with(dir: &Path, extra: Vec<String>) -> Self {
        Self::start_on(dir, free_port, extra)
    }

    /// Starts a server on a port of `pick`. A free port can be taken by another process
    /// before the server binds it (the tests run side by side and connect from ephemeral
    /// ports): a server that exits at start is started again on the next port.
    fn start_on(dir: &Path, mut pick: impl FnMut() -> u16, extra: Vec<String>) -> Self {
        let mut redis = Self {
            port: pick(),
            dir: dir.to_path_buf(),
            proc: None,
            extra,
        };
        for _ in 0..4 {
            match redis.try_start() {
                Ok(()) => return redis,
                Err(log) => eprintln!("redis-server on {} exited at start: {log}", redis.port),
            }
            redis.port = pick();
        }
        redis.restart();
        redis
    }

    /// A server that also listens with TLS on `tls_port` (the certificates of
    /// [`make_certificates`] in `dir`, no client certificates) and requires `password`.
    pub fn start_tls(dir: &Path, tls_port: u16, password: &str) -> Self {
        make_certificates(dir);
        let file = |name: &str| dir.join(name).display().to_string();
        let extra = [
            ("--tls-port", tls_port.to_string()),
            ("--tls-cert-file", file("coordinator.pem")),
            ("--tls-key-file", file("coordinator.key")),
            ("--tls-ca-cert-file", file("ca.pem")),
            ("--tls-auth-clients", "no".into()),
            ("--requirepass", password.into()),
        ];
        let extra = extra
            .into_iter()
            .flat_map(|(f, v)| [f.to_string(), v])
            .collect();
        Self::start_with(dir, extra)
    }

    /// The URL of the server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The store flags of the binaries that use this server.
    pub fn flags(&self) -> Vec<String> {
        vec!["--redis".into(), self.url()]
    }

    /// Starts the server again (same port) after [`Redis::stop`].
    pub fn restart(&mut self) {
        if let Err(log) = self.try_start() {
            panic!("redis-server on {} exited at start: {log}", self.port);
        }
    }

    /// Starts the server and waits until it answers; what it logged when it exited
    /// instead. Only a stall is bounded: a loaded machine may take long to start it.
    fn try_start(&mut self) -> Result<(), String> {
        let program = which("redis-server")
            .expect("redis-server is not installed (apt-get install -y redis-server)");
        let args = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
        ];
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.push(self.dir.display().to_string());
        args.extend(self.extra.iter().cloned());
        let log = self.dir.join("redis.log");
        let child = Command::new(program)
            .args(&args)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.proc = Some(Proc {
            child,
            log,
            _stdout: None,
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.command(&[b"PING"]).is_err() {
            let proc = self.proc.as_mut().unwrap();
            if proc.child.try_wait().unwrap().is_some() {
                let log = proc.log();
                self.proc = None;
                return Err(log);
            }
            assert!(Instant::now() < deadline, "redis-server stalled at start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Whether the server runs (it was not stopped).
    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }

    /// Stops the server.
    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Sends one command and returns the raw reply.
    pub fn command(&self, args: &[&[u8]]) -> std::io::Result<Vec<u8>> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        stream.write_all(&out)?;
        let mut reply = vec![0u8; 1 << 16];
        let n = stream.read(&mut reply)?;
        reply.truncate(n);
        Ok(reply)
    }

    /// The integer reply of one command.
    pub fn integer(&self, args: &[&[u8]]) -> i64 {
        let reply = self.command(args).unwrap();
        let text = String::from_utf8_lossy(&reply);
        text.trim()
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not an integer reply: {text}"))
    }

    /// The serialized value of `key` (`DUMP`), to be put back with [`Redis::restore_key`].
    pub fn dump(&self, key: &str) -> Vec<u8> {
        let reply = self.command(&[b"DUMP", key.as_bytes()]).unwrap();
        let header_end = reply.windows(2).position(|w| w == b"\r\n").unwrap();
        let header = String::from_utf8_lossy(&reply[..header_end]);
        let len: usize = header
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .unwrap();
        let payload = reply[header_end + 2..].get(..len);
        payload.expect("a whole DUMP reply").to_vec()
    }

    /// Puts `key` back as `dump` holds it, replacing what it holds now.
    pub fn restore_key(&self, key: &str, dump: &[u8]) {
        let reply = self.command(&[b"RESTORE", key.as_bytes(), b"0", dump, b"REPLACE"]);
        assert_eq!(reply.unwrap(), b"+OK\r\n", "RESTORE {key}");
    }

    /// Every key matching `pattern`.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        self.strings(&[b"KEYS", pattern.as_bytes()])
    }

    /// The strings of one command's reply (a bulk string or an array of them).
    pub fn strings(&self, args: &[&[u8]]) -> Vec<String> {
        let reply = String::from_utf8_lossy(&self.command(args).unwrap()).to_string();
        reply
            .lines()
            .filter(|l| !l.starts_with('*') && !l.starts_with('$'))
            .map(str::to_string)
            .collect()
    }

    /// Sends one command that must answer `+OK`.
    fn ok(&self, args: &[&[u8]]) {
        let reply = self.command(args).unwrap();
        assert_eq!(reply, b"+OK\r\n", "{}", String::from_utf8_lossy(&reply));
    }
}

/// A Redis Cluster of this test alone: three masters with a replica each, every node a
/// `redis-server --cluster-enabled yes` with its files in a directory of its own.
pub struct RedisCluster {
    /// The nodes, in the order they were created (the first three the masters).
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    /// Starts six nodes on free loopback ports and joins them into one cluster whose
    /// replicas take over a master after `node_timeout_ms` of silence.
    pub fn start(dir: &Path, node_timeout_ms: u32) -> Self {
        let nodes: Vec<Redis> = (0..6)
            .map(|i| {
                let node_dir = dir.join(format!("redis-{i}"));
                std::fs::create_dir_all(&node_dir).unwrap();
                let extra = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    &node_timeout_ms.to_string(),
                    "--repl-diskless-sync-delay",
                    "0",
                ];
                Redis::start_on(
                    &node_dir,
                    || quiet_port(true),
                    extra.map(String::from).to_vec(),
                )
            })
            .collect();
        let mut create = Command::new(which("redis-cli").expect("redis-cli is not installed"));
        create.args(["--cluster", "create"]);
        create.args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = create.output().unwrap();
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Self { nodes };
        cluster.wait_ok(Duration::from_secs(60));
        cluster
    }

    /// Waits until every live node says the cluster is `ok` (all slots served) and every
    /// replica has synchronised with its master (a replica that never did cannot take
    /// over).
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let reply = |node: &Redis, args: &[&[u8]]| {
            node.command(args)
                .map(|r| String::from_utf8_lossy(&r).to_string())
                .unwrap_or_default()
        };
        let ok = |node: &Redis| {
            let replication = reply(node, &[b"INFO", b"replication"]);
            let synced = replication.contains("role:master")
                || replication.contains("master_link_status:up");
            synced && reply(node, &[b"CLUSTER", b"INFO"]).contains("cluster_state:ok")
        };
        while !self.nodes.iter().filter(|n| n.proc.is_some()).all(ok) {
            assert!(Instant::now() < deadline, "the Redis Cluster is not ok");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The master of the slot of the session being generated (the one whose lease is
    /// held now), and that session's lease key.
    pub fn generating(&self) -> (usize, String) {
        self.any_generating().expect("a held lease")
    }

    /// [`RedisCluster::generating`] for one of the sessions being generated; `None` when
    /// no lease is held.
    pub fn any_generating(&self) -> Option<(usize, String)> {
        (0..self.nodes.len()).find_map(|i| {
            let node = &self.nodes[i];
            let live = node.proc.is_some() && self.is_master(i);
            let lease = live.then(|| node.keys("*:lease").pop()).flatten()?;
            Some((i, lease))
        })
    }

    /// Starts again every node that was stopped: it rejoins as a replica of the master
    /// that took its place.
    pub fn restart_stopped(&mut self) {
        for node in self.nodes.iter_mut().filter(|n| n.proc.is_none()) {
            node.restart();
        }
    }

    /// The node that is master of the slot of the one key matching `pattern`.
    pub fn master_of(&self, pattern: &str) -> usize {
        let holding = (0..self.nodes.len()).find(|&i| {
            let node = &self.nodes[i];
            node.proc.is_some() && self.is_master(i) && !node.keys(pattern).is_empty()
        });
        holding.unwrap_or_else(|| panic!("no master holds {pattern}"))
    }

    /// Moves the slot of the one key matching `pattern` from its master to another one
    /// while clients use it, as `redis-cli --cluster reshard` does: the target imports
    /// it, the source migrates it, its keys are `MIGRATE`d one at a time with a pause
    /// between (so that clients meet the slot split: ASK, and TRYAGAIN for a script
    /// whose keys are on both sides), then every master is told the slot's new owner
    /// (MOVED from then on). Returns the new master.
    pub fn migrate_slot_of(&self, pattern: &str) -> usize {
        let from = self.master_of(pattern);
        let source = &self.nodes[from];
        let key = source.keys(pattern).pop().expect("a key");
        let slot = source
            .integer(&[b"CLUSTER", b"KEYSLOT", key.as_bytes()])
            .to_string();
        let masters: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].proc.is_some() && self.is_master(i))
            .collect();
        let to = *masters
            .iter()
            .find(|&&i| i != from)
            .expect("another master");
        let target = &self.nodes[to];
        let id = |node: &Redis| node.strings(&[b"CLUSTER", b"MYID"]).remove(0);
        let (source_id, target_id) = (id(source), id(target));
        let slot = slot.as_bytes();
        target.ok(&[
            b"CLUSTER",
            b"SETSLOT",
            slot,
            b"IMPORTING",
            source_id.as_bytes(),
        ]);
        source.ok(&[
            b"CLUSTER",
            b"SETSLOT",
            slot,
            b"MIGRATING",
            target_id.as_bytes(),
        ]);
        let port = target.port.to_string();
        loop {
            let keys = source.strings(&[b"CLUSTER", b"GETKEYSINSLOT", slot, b"1"]);
            let Some(key) = keys.first() else { break };
            let reply = source
                .command(&[
                    b"MIGRATE",
                    b"127.0.0.1",
                    port.as_bytes(),
                    key.as_bytes(),
                    b"0",
                    b"5000",
                ])
                .unwrap();
            // NOKEY: the key expired or was deleted since it was listed.
            assert!(
                reply == b"+OK\r\n" || reply == b"+NOKEY\r\n",
                "MIGRATE: {}",
                String::from_utf8_lossy(&reply)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The target first, then the source, then the others, as Redis' own resharding
        // does: the source must not redirect to a target that does not own the slot yet.
        let others = masters.iter().filter(|&&m| m != from && m != to);
        for &m in [to, from].iter().chain(others) {
            self.nodes[m].ok(&[b"CLUSTER", b"SETSLOT", slot, b"NODE", target_id.as_bytes()]);
        }
        to
    }

    fn is_master(&self, node: usize) -> bool {
        self.nodes[node]
            .command(&[b"ROLE"])
            .is_ok_and(|r| String::from_utf8_lossy(&r).contains("master"))
    }

    /// The seed nodes, as `--redis-cluster` takes them.
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect();
        urls.join(",")
    }

    /// The store flags of the binaries that use this cluster.
    pub fn flags(&self) -> Vec<String> {
        vec!["--redis-cluster".into(), self.urls()]
    }
}

/// A free loopback port below the kernel's ephemeral range, so that no connection of the
/// tests beside this one takes it between its pick and its server's bind (or while its
/// server is down); with `with_bus`, port + 10000 (a cluster node's bus) is free too.
/// Ports come from [10000, 20000) and buses from [20000, 30000), so that no pick is
/// another node's bus.
fn quiet_port(with_bus: bool) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let low: u32 = ephemeral
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    const FIRST: u32 = 10_000;
    let span = (low.min(55_536).saturating_sub(FIRST + 10_000)).clamp(100, 10_000);
    // Tests in other processes pick too: each process starts at its own place.
    let nanos = std::time::SystemTime::UNIX_EPOCH
        .elapsed()
        .unwrap()
        .subsec_nanos();
    let _ = NEXT.compare_exchange(0, (std::process::id() ^ nanos) | 1, SeqCst, SeqCst);
    for _ in 0..span {
        let port = (FIRST + NEXT.fetch_add(1, SeqCst) % span) as u16;
        let free = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free(port) && (!with_bus || free(port + 10_000)) {
            return port;
        }
    }
    panic!("no free port below {low}");
}

fn owned(flags: &[&str]) -> Vec<String> {
    flags.iter().map(|s| s.to_string()).collect()
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Starts a coordinator of `workers` on the store of `store` flags ([`Redis::flags`],
/// [`RedisCluster::flags`], then any of the store's settings) with `routing` and `extra`
/// flags; returns it and its address.
pub fn start_coordinator(
    dir: &Path,
    workers: &[String],
    store: &[String],
    routing: &str,
    extra: &[&str],
) -> (Proc, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let workers = workers.join(",");
    let [store_flag, store_value, settings @ ..] = store else {
        panic!("store flags begin with one flag and its value");
    };
    // Training jobs' data lies under the test's directory.
    let data_root = dir.display().to_string();
    let base = [
        ("--addr", addr.as_str()),
        ("--workers", &workers),
        ("--training-data-root", &data_root),
        (store_flag.as_str(), store_value.as_str()),
        ("--routing", routing),
        ("--health-interval-secs", "0.2"),
        ("--stall-floor-secs", "5"),
    ];
    // A flag in `extra` replaces the default one.
    let args: Vec<String> = base
        .iter()
        .filter(|(flag, _)| !extra.contains(flag))
        .flat_map(|(flag, value)| [flag.to_string(), value.to_string()])
        .chain(settings.iter().cloned())
        .chain(extra.iter().map(|s| s.to_string()))
        .collect();
    let name = format!("coordinator-{}", addr.replace([':', '.'], "-"));
    (spawn(&bin("bd3lm-coordinator"), &args, dir, &name), addr)
}

/// A tag that differs between calls.
fn rand_tag() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Whether the server at `addr` answers its health check (readiness) with SERVING.
fn serving(addr: &str) -> bool {
    health_is_serving(addr, "")
}

/// Whether the plain-text health service at `addr` reports `service` SERVING.
pub fn health_is_serving(addr: &str, service: &str) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let endpoint = format!("http://{addr}");
        let Ok(channel) = tonic::transport::Endpoint::from_shared(endpoint)
            .unwrap()
            .connect()
            .await
        else {
            return false;
        };
        let request = HealthCheckRequest {
            service: service.to_string(),
        };
        HealthClient::new(channel)
            .check(request)
            .await
            .is_ok_and(|r| r.get_ref().status == ServingStatus::Serving as i32)
    })
}

/// A coordinator and its workers on one Redis (or on a Redis Cluster).
pub struct Cluster {
    /// Holds the logs and Redis' files; removed with the cluster.
    _dir: tempfile::TempDir,
    pub redis: Redis,
    /// The Redis Cluster the processes use instead of `redis`, when they do.
    pub redis_cluster: Option<RedisCluster>,
    /// The processes' store flags.
    store: Vec<String>,
    pub workers: Vec<Proc>,
    /// The workers' addresses, in the order of `workers`.
    pub worker_addrs: Vec<String>,
    pub coordinator: Proc,
    pub addr: String,
    /// The API key of the cluster's own calls, when it takes keys.
    pub api_key: Option<String>,
    /// The CA of the coordinator's certificate, when it speaks TLS.
    pub tls_ca: Option<String>,
    /// Each worker's command line, to restart it.
    worker_args: Vec<Vec<String>>,
    /// The coordinator's metrics and health ports, when observed.
    pub coordinator_ports: Option<Observed>,
    /// The workers' metrics and health ports, when observed.
    pub worker_ports: Vec<Observed>,
}

/// The plain-text ports of a process of an observed cluster.
#[derive(Debug, Clone)]
pub struct Observed {
    /// `host:port` of its Prometheus metrics.
    pub metrics: String,
    /// `host:port` of its plain-text health service.
    pub health: String,
}

impl Observed {
    /// Two free ports, and the flags that serve them.
    fn new() -> (Self, Vec<String>) {
        let ports = Self {
            metrics: format!("127.0.0.1:{}", free_port()),
            health: format!("127.0.0.1:{}", free_port()),
        };
        let flags = vec![
            "--metrics-addr".into(),
            ports.metrics.clone(),
            "--health-addr".into(),
            ports.health.clone(),
        ];
        (ports, flags)
    }

    /// The Prometheus text served now.
    pub fn scrape(&self) -> String {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&self.metrics).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        body.to_string()
    }
}

/// The flags of a cluster's processes beyond the defaults, and what its own calls need.
#[derive(Debug, Clone, Default)]
struct Secured {
    coordinator: Vec<String>,
    worker: Vec<String>,
    /// Store settings every process takes.
    store: Vec<String>,
    api_key: Option<String>,
    tls_ca: Option<String>,
    /// Whether every process serves metrics and plain-text health on ports of its own.
    observed: bool,
}

impl Secured {
    /// API keys, the internal token and (with `tls`) certificates, written into `dir`.
    fn write(dir: &Path, tls: bool) -> Self {
        std::fs::write(dir.join("api-keys"), API_KEYS.join("\n")).unwrap();
        std::fs::write(dir.join("internal-token"), INTERNAL_TOKEN).unwrap();
        let file = |name: &str| dir.join(name).display().to_string();
        let mut coordinator = vec![
            "--max-sessions-per-key".to_string(),
            "4".into(),
            "--api-keys".to_string(),
            file("api-keys"),
            "--internal-token-file".into(),
            file("internal-token"),
        ];
        let mut worker = vec!["--internal-token-file".to_string(), file("internal-token")];
        if tls {
            make_certificates(dir);
            coordinator.extend(
                ["--tls-cert", "--tls-key", "--tls-ca"]
                    .into_iter()
                    .map(String::from)
                    .zip([
                        file("coordinator.pem"),
                        file("coordinator.key"),
                        file("ca.pem"),
                    ])
                    .flat_map(|(f, v)| [f, v]),
            );
            worker.extend(
                ["--tls-cert", "--tls-key", "--tls-client-ca"]
                    .into_iter()
                    .map(String::from)
                    .zip([file("worker.pem"), file("worker.key"), file("ca.pem")])
                    .flat_map(|(f, v)| [f, v]),
            );
        }
        Self {
            coordinator,
            worker,
            api_key: Some(API_KEYS[0].to_string()),
            tls_ca: tls.then(|| file("ca.pem")),
            ..Self::default()
        }
    }
}

/// Writes a test CA (`ca.pem`, `ca.key`) and certificates it signed into `dir`:
/// `worker.pem`/`.key` (name `bd3lm-worker`), `coordinator.pem`/`.key` (127.0.0.1 and
/// `localhost`, server and client usage), `stranger.pem`/`.key` (signed by another CA).
pub fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed (apt-get install -y openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "other-ca"] {
        let subject = format!("/CN=bd3lm test {ca}");
        let (keyout, out) = (format!("{ca}.key"), format!("{ca}.pem"));
        let mut args = vec![
            "req", "-x509", "-days", "2", "-subj", &subject, "-keyout", &keyout, "-out", &out,
        ];
        args.extend(key);
        args.extend([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ]);
        openssl(&args);
    }
    let leaves = [
        ("worker", "ca", "DNS:bd3lm-worker"),
        ("coordinator", "ca", "IP:127.0.0.1,DNS:localhost"),
        ("stranger", "other-ca", "DNS:bd3lm-worker,IP:127.0.0.1"),
    ];
    for (name, ca, names) in leaves {
        let ext = format!("{name}.ext");
        std::fs::write(
            dir.join(&ext),
            format!("subjectAltName={names}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"),
        )
        .unwrap();
        let (keyout, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        let subject = format!("/CN={name}");
        let mut args = vec!["req", "-subj", &subject, "-keyout", &keyout, "-out", &csr];
        args.extend(key);
        openssl(&args);
        let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
        openssl(&[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &pem,
            "-extfile",
            &ext,
        ]);
    }
}

/// The API keys of [`Cluster::start_secured`].
pub const API_KEYS: [&str; 2] = ["key-alpha-0123456789", "key-beta-9876543210"];

/// The workers' internal token of [`Cluster::start_secured`].
pub const INTERNAL_TOKEN: &str = "internal-5f2e9c-7a41d0";

impl Cluster {
    /// Starts Redis, `workers` workers on `checkpoint` and a coordinator with `routing`.
    pub fn start(checkpoint: &Path, workers: usize, routing: &str) -> Self {
        Self::start_with(checkpoint, workers, routing, &[])
    }

    /// [`Cluster::start`] with `extra` coordinator flags.
    pub fn start_with(checkpoint: &Path, workers: usize, routing: &str, extra: &[&str]) -> Self {
        let flags = Secured {
            coordinator: owned(extra),
            ..Secured::default()
        };
        Self::start_flagged(checkpoint, workers, routing, flags)
    }

    /// [`Cluster::start`] with `flags` on every worker's command line.
    pub fn start_with_worker_flags(
        checkpoint: &Path,
        workers: usize,
        routing: &str,
        flags: &[&str],
    ) -> Self {
        let flags = Secured {
            worker: owned(flags),
            ..Secured::default()
        };
        Self::start_flagged(checkpoint, workers, routing, flags)
    }

    fn start_flagged(checkpoint: &Path, workers: usize, routing: &str, flags: Secured) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, checkpoint, workers, routing, Some(&flags), None)
    }

    /// [`Cluster::start_with`] with the sessions on a Redis Cluster of its own
    /// ([`RedisCluster::start`], replicas taking over after `node_timeout_ms`).
    pub fn start_on_redis_cluster(
        checkpoint: &Path,
        workers: usize,
        routing: (&str, &[&str]),
        node_timeout_ms: u32,
    ) -> Self {
        Self::start_on_redis_cluster_with(checkpoint, workers, routing, node_timeout_ms, &[])
    }

    /// [`Cluster::start_on_redis_cluster`] with `store` flags (of the store's settings)
    /// on every process.
    pub fn start_on_redis_cluster_with(
        checkpoint: &Path,
        workers: usize,
        (routing, extra): (&str, &[&str]),
        node_timeout_ms: u32,
        store: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let redis = RedisCluster::start(dir.path(), node_timeout_ms);
        let flags = Secured {
            coordinator: owned(extra),
            store: owned(store),
            ..Secured::default()
        };
        Self::start_in(dir, checkpoint, workers, routing, Some(&flags), Some(redis))
    }

    /// A cluster whose coordinator takes API keys [`API_KEYS`] (file `api-keys` in its
    /// directory) and whose workers take only the internal token [`INTERNAL_TOKEN`]; its
    /// own calls use the first key.
    pub fn start_secured(checkpoint: &Path, workers: usize) -> Self {
        Self::start_secured_with(checkpoint, workers, &[], &[])
    }

    /// [`Cluster::start_secured`] with `coordinator` and `worker` flags beyond its own.
    pub fn start_secured_with(
        checkpoint: &Path,
        workers: usize,
        coordinator: &[&str],
        worker: &[&str],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut secured = Secured::write(dir.path(), false);
        // A flag given here replaces the secured cluster's own.
        for flag in coordinator.iter().filter(|f| f.starts_with("--")) {
            if let Some(at) = secured.coordinator.iter().position(|f| f == flag) {
                secured.coordinator.drain(at..at + 2);
            }
        }
        secured.coordinator.extend(owned(coordinator));
        secured.worker.extend(owned(worker));
        Self::start_in(dir, checkpoint, workers, "affinity", Some(&secured), None)
    }

    /// [`Cluster::start_secured`] with TLS everywhere: the coordinator's public port
    /// (certificate for 127.0.0.1), mutual TLS between it and the workers (certificates
    /// of [`make_certificates`]).
    pub fn start_tls(checkpoint: &Path, workers: usize) -> Self {
        Self::start_tls_with(checkpoint, workers, &[])
    }

    /// [`Cluster::start_tls`] with more `coordinator` flags.
    pub fn start_tls_with(checkpoint: &Path, workers: usize, coordinator: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut secured = Secured::write(dir.path(), true);
        secured.coordinator.extend(owned(coordinator));
        Self::start_in(dir, checkpoint, workers, "affinity", Some(&secured), None)
    }

    /// [`Cluster::start_tls`] with every process serving metrics and plain-text health
    /// on ports of its own ([`Cluster::coordinator_ports`], [`Cluster::worker_ports`]),
    /// as the Helm chart runs them.
    pub fn start_observed(checkpoint: &Path, workers: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let secured = Secured {
            observed: true,
            ..Secured::write(dir.path(), true)
        };
        Self::start_in(dir, checkpoint, workers, "affinity", Some(&secured), None)
    }

    fn start_in(
        dir: tempfile::TempDir,
        checkpoint: &Path,
        workers: usize,
        routing: &str,
        secured: Option<&Secured>,
        redis_cluster: Option<RedisCluster>,
    ) -> Self {
        let mut secured = secured.cloned().unwrap_or_default();
        let coordinator_ports = secured.observed.then(|| {
            let (ports, flags) = Observed::new();
            secured.coordinator.extend(flags);
            ports
        });
        let mut worker_ports = Vec::new();
        let extra: Vec<&str> = secured.coordinator.iter().map(String::as_str).collect();
        let redis = Redis::start(dir.path());
        let mut store = match &redis_cluster {
            Some(cluster) => cluster.flags(),
            None => redis.flags(),
        };
        store.extend(secured.store.iter().cloned());
        let mut procs = Vec::new();
        let mut addrs = Vec::new();
        let mut worker_args = Vec::new();
        for i in 0..workers {
            let addr = format!("127.0.0.1:{}", free_port());
            let mut args = vec![
                "--addr".into(),
                addr.clone(),
                "--checkpoint".into(),
                checkpoint.display().to_string(),
            ];
            args.extend(store.iter().cloned());
            args.extend(secured.worker.iter().cloned());
            if secured.observed {
                let (ports, flags) = Observed::new();
                args.extend(flags);
                worker_ports.push(ports);
            }
            procs.push(spawn(
                &bin("bd3lm-worker"),
                &args,
                dir.path(),
                &format!("worker{i}"),
            ));
            addrs.push(addr);
            worker_args.push(args);
        }
        let (coordinator, addr) = start_coordinator(dir.path(), &addrs, &store, routing, &extra);
        let cluster = Self {
            api_key: secured.api_key,
            tls_ca: secured.tls_ca,
            _dir: dir,
            redis,
            redis_cluster,
            store,
            workers: procs,
            worker_addrs: addrs,
            coordinator,
            addr,
            worker_args,
            coordinator_ports,
            worker_ports,
        };
        cluster.wait_ready();
        cluster
    }

    /// Starts worker `i` again, at its address, after it was killed (its old log is
    /// kept under another name).
    pub fn restart_worker(&mut self, i: usize) {
        self.workers[i].kill();
        let log = self.dir().join(format!("worker{i}.log"));
        let kept = self.dir().join(format!("worker{i}.{}.log", rand_tag()));
        let _ = std::fs::rename(&log, kept);
        self.workers[i] = spawn(
            &bin("bd3lm-worker"),
            &self.worker_args[i],
            self.dir(),
            &format!("worker{i}"),
        );
    }

    /// Every worker log, the restarted workers' earlier ones included.
    pub fn worker_logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(self.dir()).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("worker") && name.ends_with(".log") {
                all.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
            }
        }
        all
    }

    /// The cluster's directory (logs, Redis' files, key files).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Another coordinator of the same workers and Redis, with `extra` flags; returns it
    /// and its address once it reports SERVING.
    pub fn add_coordinator(&self, extra: &[&str]) -> (Proc, String) {
        let dir = self._dir.path();
        let started = start_coordinator(dir, &self.worker_addrs, &self.store, "affinity", extra);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !serving(&started.1) {
            assert!(
                Instant::now() < deadline,
                "the second coordinator is not ready"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        started
    }

    /// Waits until a generation succeeds (workers loaded and healthy).
    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.generate(&["--prompt-ids", "1022", "--max-tokens", "1"]);
            if out.code == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not ready: {}",
                out.stderr
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Calls the coordinator's `Generate` directly, all `requests` at once, for what the
    /// command line does not print (each block's worker and timings).
    pub fn generate_grpc(
        &self,
        requests: Vec<GenerateRequest>,
    ) -> Vec<Result<GenerateResponse, Status>> {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let client = GenerationClient::connect(format!("http://{}", self.addr))
                .await
                .unwrap();
            let calls = requests.into_iter().map(|request| {
                let mut client = client.clone();
                async move {
                    client
                        .generate(request)
                        .await
                        .map(tonic::Response::into_inner)
                }
            });
            futures::future::join_all(calls).await
        })
    }

    /// Worker `i`'s `Info`; `None` when it does not answer.
    pub fn worker_info(&self, i: usize) -> Option<InfoResponse> {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let addr = format!("http://{}", self.worker_addrs[i]);
            let mut client = DenoiseWorkerClient::connect(addr).await.ok()?;
            let info = client.info(InfoRequest {}).await.ok()?;
            Some(info.into_inner())
        })
    }

    /// Whether the coordinator's health (readiness) says SERVING.
    pub fn ready(&self) -> bool {
        serving(&self.addr)
    }

    /// Whether worker `i`'s health says SERVING.
    pub fn worker_ready(&self, i: usize) -> bool {
        serving(&self.worker_addrs[i])
    }

    /// Waits up to `within` for readiness to become `ready`; whether it did.
    pub fn wait_ready_is(&self, ready: bool, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.ready() == ready {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Runs `bd3lm generate --addr` with `args`.
    pub fn generate(&self, args: &[&str]) -> Generated {
        let mut all = vec!["generate", "--addr", self.addr.as_str()];
        if let Some(key) = &self.api_key {
            all.extend(["--api-key", key.as_str()]);
        }
        if let Some(ca) = &self.tls_ca {
            all.extend(["--tls-ca", ca.as_str()]);
        }
        all.extend_from_slice(args);
        Generated::from(crate::bd3lm(&all))
    }
}

/// The outcome of a `bd3lm generate` run.
pub struct Generated {
    pub code: i32,
    pub ids: Vec<u32>,
    pub stderr: String,
}

impl Generated {
    /// The session id from the summary line.
    pub fn session(&self) -> String {
        self.stderr
            .split("session ")
            .nth(1)
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}

impl From<std::process::Output> for Generated {
    fn from(out: std::process::Output) -> Self {
        let stdout = String::from_utf8_lossy(&out.stdout);
        Self {
            code: out.status.code().unwrap_or(-1),
            ids: stdout
                .split_whitespace()
                .filter_map(|t| t.parse().ok())
                .collect(),
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
        }
    }
}
