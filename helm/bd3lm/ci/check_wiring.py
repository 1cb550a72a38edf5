#!/usr/bin/env python3
"""Checks that a render of the bd3lm chart wires up, beyond what schemas can see.

    check_wiring.py RENDER.yaml [VALUES.yaml ...]   # exit 1, one line per fault
    check_wiring.py --self-test RENDER.yaml [VALUES.yaml ...]

* the coordinators' BD3LM_WORKERS_DNS names a headless Service (by its cluster DNS
  name) that selects the worker pods, on a port that reaches their gRPC port;
* every probe's port is a port of its container;
* every Secret and ConfigMap a pod reads exists in the render, or is named in the
  values as one the operator provides (keys ending in Secret/existingSecret);
* every file a BD3LM_* variable names lies on a volume mounted in the container;
* the trainers, the workers following the registry and the coordinators checking job
  data see one training claim at the same paths, the trainers read-write;
* every Service, PodDisruptionBudget and ServiceMonitor selects pods or Services that
  exist, and HorizontalPodAutoscalers scale Deployments that exist;
* pods get more grace than their drain;
* hardening: every emptyDir has a sizeLimit, every container (init containers too)
  requests ephemeral storage, every long-running container has a liveness probe, no
  container takes a password on its command line, and no Service that leaves the
  cluster (LoadBalancer, NodePort) carries a metrics port, and every pod reading a
  Secret carries the checksum that restarts it when the Secret changes;
* with NetworkPolicies: every coordinator, worker and trainer pod has its egress limited
  and may reach DNS, and the coordinators' egress reaches the workers' gRPC port.

--self-test breaks the render in one place per rule and fails unless each break is
found, so that the checks cannot pass vacuously.
"""

import copy
import sys

import yaml

WORKLOADS = ("Deployment", "StatefulSet")


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def provided_secrets(values_files):
    """Secret names the values say the operator creates."""
    names = set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(value, str) and value and (
                    key.endswith("Secret") or key == "existingSecret"
                ):
                    names.add(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for path in values_files:
        with open(path) as f:
            walk(yaml.safe_load(f) or {})
    return names


def named(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d.get("kind") == kind}


def pods(docs):
    """(workload, pod template) of every workload, and (pod, pod) of bare pods (tests)."""
    return [(d, d["spec"]["template"]) for d in docs if d.get("kind") in WORKLOADS] + [
        (d, d) for d in docs if d.get("kind") == "Pod"
    ]


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def env_of(container, configmaps):
    """The container's environment: its ConfigMaps' data, then its own values."""
    env = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref and ref["name"] in configmaps:
            env.update(configmaps[ref["name"]].get("data") or {})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
    return env


def container_ports(container):
    ports = container.get("ports", [])
    return {p["containerPort"] for p in ports} | {p["name"] for p in ports if "name" in p}


def check_workers_dns(docs, faults):
    """Each name of the coordinators' BD3LM_WORKERS_DNS is a headless Service reaching its
    workers' gRPC port, and every worker pool is reached by one of them."""
    configmaps = named(docs, "ConfigMap")
    services = named(docs, "Service")
    found = False
    for workload, template in pods(docs):
        for c in template["spec"]["containers"]:
            targets = env_of(c, configmaps).get("BD3LM_WORKERS_DNS")
            if targets is None:
                continue
            found = True
            reached = []
            for target in targets.split(","):
                reached += check_worker_name(workload, target, services, docs, faults)
            for pool, t in pods(docs):
                is_worker = any(cc["name"] == "worker" for cc in t["spec"]["containers"])
                if is_worker and not any(t is r for r in reached):
                    faults.append(f"{workload['metadata']['name']}: no BD3LM_WORKERS_DNS name reaches {pool['metadata']['name']}")
    if not found:
        faults.append("no coordinator has BD3LM_WORKERS_DNS")


def check_worker_name(workload, target, services, docs, faults):
    """The worker pod templates one NAME.NAMESPACE.svc.cluster.local:PORT reaches."""
    host, _, port = target.rpartition(":")
    name, _, rest = host.partition(".")
    namespace = rest.split(".")[0]
    svc = services.get(name)
    where = f"{workload['metadata']['name']}: BD3LM_WORKERS_DNS {target}"
    if svc is None:
        faults.append(f"{where}: no Service {name}")
        return []
    if not namespace or not rest.endswith(".svc.cluster.local"):
        faults.append(f"{where}: not NAME.NAMESPACE.svc.cluster.local")
    if svc["spec"].get("clusterIP") != "None":
        faults.append(f"{where}: Service {name} is not headless")
    selected = [
        t for _, t in pods(docs) if selects(svc["spec"]["selector"], t["metadata"]["labels"])
    ]
    workers = [
        t for t in selected
        if any(cc["name"] == "worker" for cc in t["spec"]["containers"])
    ]
    if not workers:
        faults.append(f"{where}: Service {name} selects no worker pods")
        return []
    port_entry = next(
        (p for p in svc["spec"]["ports"] if str(p["port"]) == port), None
    )
    if port_entry is None:
        faults.append(f"{where}: Service {name} has no port {port}")
        return []
    worker = next(cc for cc in workers[0]["spec"]["containers"] if cc["name"] == "worker")
    target_port = port_entry.get("targetPort", port_entry["port"])
    grpc = next((p for p in worker["ports"] if p.get("name") == "grpc"), None)
    if grpc is None or target_port not in (grpc["name"], grpc["containerPort"]):
        faults.append(f"{where}: port {port} does not reach the workers' gRPC port")
        return []
    return workers


def check_probes(docs, faults):
    for workload, template in pods(docs):
        for c in template["spec"]["containers"]:
            ports = container_ports(c)
            for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
                probe = c.get(kind)
                if not probe:
                    continue
                for action in ("grpc", "tcpSocket", "httpGet"):
                    if action in probe and probe[action]["port"] not in ports:
                        faults.append(
                            f"{workload['metadata']['name']}/{c['name']}: {kind} port "
                            f"{probe[action]['port']} is not a container port"
                        )


def check_references(docs, provided, faults):
    secrets = set(named(docs, "Secret")) | provided
    configmaps = set(named(docs, "ConfigMap"))
    for workload, template in pods(docs):
        where = workload["metadata"]["name"]
        spec = template["spec"]
        for volume in spec.get("volumes", []):
            if "secret" in volume and volume["secret"]["secretName"] not in secrets:
                faults.append(f"{where}: volume {volume['name']} reads a missing Secret {volume['secret']['secretName']}")
            if "configMap" in volume and volume["configMap"]["name"] not in configmaps:
                faults.append(f"{where}: volume {volume['name']} reads a missing ConfigMap")
        for c in spec["containers"]:
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"] not in secrets:
                    faults.append(f"{where}: {var['name']} reads a missing Secret {ref['name']}")
            for source in c.get("envFrom", []):
                if "configMapRef" in source and source["configMapRef"]["name"] not in configmaps:
                    faults.append(f"{where}: envFrom reads a missing ConfigMap {source['configMapRef']['name']}")
                if "secretRef" in source and source["secretRef"]["name"] not in secrets:
                    faults.append(f"{where}: envFrom reads a missing Secret {source['secretRef']['name']}")


def check_files(docs, faults):
    """BD3LM_*_FILE, BD3LM_TLS_*, BD3LM_REDIS_CA and BD3LM_TOKENIZER paths are mounted
    (paths under /opt/bd3lm come with the image)."""
    configmaps = named(docs, "ConfigMap")
    for workload, template in pods(docs):
        for c in template["spec"]["containers"]:
            mounts = [m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts", [])]
            env = env_of(c, configmaps)
            # Each MODEL=FILE of BD3LM_MODEL_TOKENIZERS is a file too.
            files = list(env.items()) + [
                ("BD3LM_MODEL_TOKENIZERS:" + entry.split("=", 1)[0], entry.split("=", 1)[1])
                for entry in env.get("BD3LM_MODEL_TOKENIZERS", "").split(",") if "=" in entry
            ]
            for var, path in files:
                is_file = var.startswith("BD3LM_") and var != "BD3LM_MODEL_TOKENIZERS" and (
                    var.startswith("BD3LM_MODEL_TOKENIZERS:") or
                    var.endswith("_FILE") or var.startswith("BD3LM_TLS_") and var != "BD3LM_TLS_WORKER_NAME"
                    or var in ("BD3LM_REDIS_CA", "BD3LM_TOKENIZER", "BD3LM_CHECKPOINT")
                    or var in TRAINING_PATHS
                )
                if not is_file or path.startswith("/opt/bd3lm/"):
                    continue
                if not any((path.rstrip("/") + "/").startswith(m) for m in mounts):
                    faults.append(f"{workload['metadata']['name']}/{c['name']}: {var}={path} is on no mounted volume")


TRAINING_PATHS = ("BD3LM_RUNS_DIR", "BD3LM_REGISTRY_DIR", "BD3LM_TRAINING_DATA_ROOT")


def claim_at(template, container, path):
    """(claim, mount path, read-only) of the volume holding `path` in the container."""
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in template["spec"].get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    for m in container.get("volumeMounts", []):
        root = m["mountPath"].rstrip("/") + "/"
        if (path.rstrip("/") + "/").startswith(root) and m["name"] in claims:
            return claims[m["name"]], m["mountPath"], bool(m.get("readOnly"))
    return None


def check_training(docs, faults):
    """Runs, the registry and job data are one claim at one path everywhere; trainers
    write it."""
    configmaps = named(docs, "ConfigMap")
    seen = {}
    for workload, template in pods(docs):
        for c in template["spec"]["containers"]:
            env = env_of(c, configmaps)
            for var in TRAINING_PATHS:
                if var not in env:
                    continue
                where = f"{workload['metadata']['name']}/{c['name']}: {var}={env[var]}"
                found = claim_at(template, c, env[var])
                if found is None:
                    faults.append(f"{where}: on no claim")
                    continue
                claim, mount, read_only = found
                if var == "BD3LM_RUNS_DIR" and read_only:
                    faults.append(f"{where}: the trainers' claim is mounted read-only")
                seen.setdefault((claim, mount), []).append(where)
    if len(seen) > 1:
        faults.append(f"training paths on different claims or mount paths: {sorted(seen)}")


def check_world_size(docs, faults):
    """The coordinators accept no job wider than a CUDA trainer's GPUs."""
    configmaps = named(docs, "ConfigMap")
    gpus, widest = [], []
    for workload, template in pods(docs):
        for c in template["spec"]["containers"]:
            env = env_of(c, configmaps)
            if env.get("BD3LM_TRAIN_DEVICE") == "cuda":
                limits = c.get("resources", {}).get("limits", {})
                gpus += [int(v) for k, v in limits.items() if k.endswith("/gpu")]
            if "BD3LM_ADDR" in env and "BD3LM_TRAINING_DATA_ROOT" in env:
                widest.append((workload["metadata"]["name"], int(env.get("BD3LM_MAX_JOB_WORLD_SIZE", 8))))
    if not gpus:
        return
    for name, width in widest:
        if width > min(gpus):
            faults.append(f"{name}: jobs of world size {width} accepted, trainers have {min(gpus)} GPUs")


def check_selectors(docs, faults):
    templates = [t for _, t in pods(docs)]
    services = named(docs, "Service")
    for name, svc in services.items():
        chosen = [t for t in templates if selects(svc["spec"].get("selector"), t["metadata"]["labels"])]
        if not chosen:
            faults.append(f"Service {name} selects no pods")
            continue
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if not any(target in container_ports(c) for t in chosen for c in t["spec"]["containers"]):
                faults.append(f"Service {name}: targetPort {target} is on none of its pods")
    for pdb in (d for d in docs if d.get("kind") == "PodDisruptionBudget"):
        labels = pdb["spec"]["selector"]["matchLabels"]
        if not any(selects(labels, t["metadata"]["labels"]) for t in templates):
            faults.append(f"PodDisruptionBudget {pdb['metadata']['name']} selects no pods")
    deployments = named(docs, "Deployment")
    for hpa in (d for d in docs if d.get("kind") == "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        if ref["kind"] != "Deployment" or ref["name"] not in deployments:
            faults.append(f"HorizontalPodAutoscaler {hpa['metadata']['name']} scales a missing {ref['kind']} {ref['name']}")
        elif "replicas" in deployments[ref["name"]]["spec"]:
            faults.append(f"Deployment {ref['name']} sets replicas under an autoscaler")
    for monitor in (d for d in docs if d.get("kind") == "ServiceMonitor"):
        sel = monitor["spec"]["selector"]
        chosen = [
            s for s in services.values()
            if selects(sel.get("matchLabels", {}), s["metadata"]["labels"])
            and all(s["metadata"]["labels"].get(e["key"]) in e["values"] for e in sel.get("matchExpressions", []))
        ]
        for endpoint in monitor["spec"]["endpoints"]:
            if not chosen or not all(any(p.get("name") == endpoint["port"] for p in s["spec"]["ports"]) for s in chosen):
                faults.append(f"ServiceMonitor {monitor['metadata']['name']}: port {endpoint['port']} is not on every Service it selects")


def check_grace(docs, faults):
    configmaps = named(docs, "ConfigMap")
    for workload, template in pods(docs):
        for c in template["spec"]["containers"]:
            drain = env_of(c, configmaps).get("BD3LM_DRAIN_SECS")
            grace = template["spec"].get("terminationGracePeriodSeconds", 30)
            if drain is not None and grace <= float(drain):
                faults.append(f"{workload['metadata']['name']}: grace {grace}s is not above the drain {drain}s")


def check_hardening(docs, faults):
    for workload, template in pods(docs):
        where = workload["metadata"]["name"]
        spec = template["spec"]
        for volume in spec.get("volumes", []):
            if "emptyDir" in volume and not (volume["emptyDir"] or {}).get("sizeLimit"):
                faults.append(f"{where}: emptyDir {volume['name']} has no sizeLimit")
        for c in spec.get("initContainers", []) + spec["containers"]:
            requests = (c.get("resources") or {}).get("requests") or {}
            if "ephemeral-storage" not in requests:
                faults.append(f"{where}/{c['name']}: no ephemeral-storage request")
            words = [str(w) for w in c.get("command", []) + c.get("args", [])]
            if any(w in ("--requirepass", "--masterauth") for w in words):
                faults.append(f"{where}/{c['name']}: a password on the command line")
        reads_secrets = any("secret" in v for v in spec.get("volumes", [])) or any(
            "secretKeyRef" in (e.get("valueFrom") or {})
            for c in spec["containers"] for e in c.get("env", [])
        )
        annotations = template["metadata"].get("annotations") or {}
        if workload.get("kind") in WORKLOADS and reads_secrets and "checksum/secrets" not in annotations:
            faults.append(f"{where}: reads Secrets but does not restart when they change")
        # A Job's or a test's pod runs to its end: no liveness to watch.
        long_running = workload.get("kind") in WORKLOADS
        for c in spec["containers"] if long_running else []:
            if "livenessProbe" not in c:
                faults.append(f"{where}/{c['name']}: no liveness probe")
    for name, service in named(docs, "Service").items():
        exposed = service["spec"].get("type") in ("LoadBalancer", "NodePort")
        if exposed and any(p.get("name") == "metrics" for p in service["spec"]["ports"]):
            faults.append(f"Service {name}: metrics on a Service that leaves the cluster")


def allows_port(rule, port):
    return any(p.get("port") == port for p in rule.get("ports", []))


def is_worker_peer(labels):
    """Whether a peer's labels select the workers (of one pool, or of every pool)."""
    return labels.get("app.kubernetes.io/component") == "worker" or labels.get("bd3lm.io/worker") == "true"


def check_egress(docs, faults):
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    if not policies:
        return
    for workload, template in pods(docs):
        labels = template["metadata"].get("labels", {})
        component = labels.get("app.kubernetes.io/component")
        if workload.get("kind") not in WORKLOADS or component not in ("coordinator", "worker", "trainer"):
            continue
        where = workload["metadata"]["name"]
        limiting = [p for p in policies if "Egress" in p["spec"].get("policyTypes", []) and selects(p["spec"]["podSelector"].get("matchLabels"), labels)]
        if not limiting:
            faults.append(f"{where}: no NetworkPolicy limits its egress")
            continue
        rules = [r for p in limiting for r in p["spec"].get("egress") or []]
        if not any(allows_port(r, 53) for r in rules):
            faults.append(f"{where}: its egress does not reach DNS")
        if component == "coordinator":
            to_workers = [
                r for r in rules
                if allows_port(r, 50061) and any(
                    is_worker_peer((peer.get("podSelector") or {}).get("matchLabels", {}))
                    for peer in r.get("to", [])
                )
            ]
            if not to_workers:
                faults.append(f"{where}: its egress does not reach the workers' gRPC port")


def check_http(docs, faults):
    """The HTTP API listens on a container port, the NetworkPolicy of its pods lets it in,
    and each Ingress reaches it through a port of its Service."""
    configmaps = named(docs, "ConfigMap")
    services = named(docs, "Service")
    policies = [d for d in docs if d.get("kind") == "NetworkPolicy"]
    for workload, template in pods(docs):
        labels = template["metadata"].get("labels", {})
        for c in template["spec"]["containers"]:
            addr = env_of(c, configmaps).get("BD3LM_HTTP_ADDR")
            if addr is None:
                continue
            where = f"{workload['metadata']['name']}/{c['name']}"
            port = int(addr.rsplit(":", 1)[1])
            if port not in container_ports(c):
                faults.append(f"{where}: the HTTP API's port {port} is not a container port")
            ingress = [
                r for p in policies if "Ingress" in p["spec"].get("policyTypes", [])
                and selects(p["spec"]["podSelector"].get("matchLabels"), labels)
                for r in p["spec"].get("ingress") or []
            ]
            if policies and not any(allows_port(r, port) for r in ingress):
                faults.append(f"{where}: no NetworkPolicy lets the HTTP API's port {port} in")
    for ingress in (d for d in docs if d.get("kind") == "Ingress"):
        for rule in ingress["spec"].get("rules", []):
            for path in rule.get("http", {}).get("paths", []):
                backend = path["backend"]["service"]
                service = services.get(backend["name"])
                wanted = backend["port"].get("name", backend["port"].get("number"))
                ports = service and [p for p in service["spec"]["ports"] if wanted in (p.get("name"), p["port"])]
                if not ports:
                    faults.append(f"{ingress['metadata']['name']}: its backend {backend['name']}:{wanted} is no Service port")
                    continue
                target = ports[0].get("targetPort", ports[0]["port"])
                selected = [
                    c for _, t in pods(docs)
                    if selects(service["spec"].get("selector"), t["metadata"].get("labels", {}))
                    for c in t["spec"]["containers"]
                ]
                if not any(target in container_ports(c) for c in selected):
                    faults.append(f"{ingress['metadata']['name']}: {backend['name']} sends to {target}, a port of none of its pods")


def check(docs, provided):
    faults = []
    check_workers_dns(docs, faults)
    check_probes(docs, faults)
    check_references(docs, provided, faults)
    check_files(docs, faults)
    check_selectors(docs, faults)
    check_grace(docs, faults)
    check_training(docs, faults)
    check_world_size(docs, faults)
    check_hardening(docs, faults)
    check_egress(docs, faults)
    check_http(docs, faults)
    return faults


def first(docs, kind, name_part):
    return next(d for d in docs if d.get("kind") == kind and name_part in d["metadata"]["name"])


def container(docs, name_part):
    return first(docs, "Deployment", name_part)["spec"]["template"]["spec"]["containers"][0]


def breaks(docs=()):
    """One break per rule: (what, how)."""

    def dns(docs):
        first(docs, "ConfigMap", "coordinator")["data"]["BD3LM_WORKERS_DNS"] = "elsewhere.default.svc.cluster.local:50061"

    def dns_port(docs):
        cm = first(docs, "ConfigMap", "coordinator")["data"]
        cm["BD3LM_WORKERS_DNS"] = cm["BD3LM_WORKERS_DNS"].rsplit(":", 1)[0] + ":9999"

    def probe(docs):
        container(docs, "worker")["readinessProbe"]["grpc"]["port"] = 50099

    def secret(docs):
        for v in first(docs, "Deployment", "worker")["spec"]["template"]["spec"]["volumes"]:
            if v["name"] == "internal-token":
                v["secret"]["secretName"] = "no-such-secret"

    def mount(docs):
        c = container(docs, "coordinator")
        c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "internal-token"]

    def selector(docs):
        first(docs, "Service", "headless")["spec"]["selector"]["app.kubernetes.io/component"] = "nobody"

    def grace(docs):
        first(docs, "Deployment", "worker")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 5

    def registry_claim(docs):
        for v in first(docs, "Deployment", "worker")["spec"]["template"]["spec"]["volumes"]:
            if v["name"] == "training":
                v["persistentVolumeClaim"]["claimName"] = "another-claim"

    def trainer_read_only(docs):
        for m in container(docs, "trainer")["volumeMounts"]:
            if m["name"] == "training":
                m["readOnly"] = True

    def no_secret_checksum(docs):
        del first(docs, "Deployment", "worker")["spec"]["template"]["metadata"]["annotations"]["checksum/secrets"]

    def unbounded_tmp(docs):
        for v in first(docs, "Deployment", "coordinator")["spec"]["template"]["spec"]["volumes"]:
            if v["name"] == "tmp":
                v["emptyDir"] = {}

    def no_ephemeral_request(docs):
        del container(docs, "worker")["resources"]["requests"]["ephemeral-storage"]

    def no_liveness(docs):
        del container(docs, "coordinator")["livenessProbe"]

    def password_argument(docs):
        container(docs, "worker").setdefault("args", []).extend(["--requirepass", "x"])

    def public_metrics(docs):
        service = next(
            d for d in docs
            if d.get("kind") == "Service" and d["metadata"]["name"].endswith("-metrics")
        )
        service["spec"]["type"] = "LoadBalancer"
        del service["spec"]["clusterIP"]

    def wide_jobs(docs):
        first(docs, "ConfigMap", "coordinator")["data"]["BD3LM_MAX_JOB_WORLD_SIZE"] = "64"

    def unresolved_pool(docs):
        cm = first(docs, "ConfigMap", "coordinator")["data"]
        cm["BD3LM_WORKERS_DNS"] = cm["BD3LM_WORKERS_DNS"].split(",")[0]

    def unmounted_tokenizer(docs):
        cm = first(docs, "ConfigMap", "coordinator")["data"]
        cm["BD3LM_MODEL_TOKENIZERS"] += ",other=/nowhere/tokenizer.json"

    def http_port(docs):
        first(docs, "ConfigMap", "coordinator")["data"]["BD3LM_HTTP_ADDR"] = "0.0.0.0:9000"

    def ingress_port(docs):
        ingress = next(d for d in docs if d.get("kind") == "Ingress")
        ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["port"] = {"name": "web"}

    def http_closed(docs):
        policy = first(docs, "NetworkPolicy", "coordinator")
        for rule in policy["spec"]["ingress"]:
            rule["ports"] = [p for p in rule.get("ports", []) if p.get("port") != 8000]

    def no_dns(docs):
        policy = first(docs, "NetworkPolicy", "worker")
        policy["spec"]["egress"] = [r for r in policy["spec"]["egress"] if not allows_port(r, 53)]

    def no_worker_egress(docs):
        policy = first(docs, "NetworkPolicy", "coordinator")
        policy["spec"]["egress"] = [r for r in policy["spec"]["egress"] if not allows_port(r, 50061)]

    def egress_open(docs):
        policy = first(docs, "NetworkPolicy", "trainer") if any(
            d.get("kind") == "NetworkPolicy" and "trainer" in d["metadata"]["name"] for d in docs
        ) else first(docs, "NetworkPolicy", "worker")
        policy["spec"]["policyTypes"] = ["Ingress"]

    policies = any(d.get("kind") == "NetworkPolicy" for d in docs)
    return ([
        ("a pod's egress without DNS", no_dns),
        ("coordinators without egress to the workers", no_worker_egress),
        ("a pod with open egress", egress_open),
    ] if policies else []) + [
        ("an emptyDir without a sizeLimit", unbounded_tmp),
        ("a pod blind to its Secrets' changes", no_secret_checksum),
        ("a container without an ephemeral-storage request", no_ephemeral_request),
        ("a container without a liveness probe", no_liveness),
        ("a password on a command line", password_argument),
        ("metrics on a LoadBalancer", public_metrics),
        ("workers DNS names another Service", dns),
        ("workers DNS on a port the workers lack", dns_port),
        ("a probe on a port the container lacks", probe),
        ("a Secret that does not exist", secret),
        ("a token file on no volume", mount),
        ("a Service selecting no pods", selector),
        ("a grace period below the drain", grace),
    ] + ([
        ("the workers' registry on another claim", registry_claim),
        ("the trainers' claim read-only", trainer_read_only),
    ] if any("trainer" in d["metadata"]["name"] for d in docs if d.get("kind") == "Deployment") else []) + ([
        ("jobs wider than the CUDA trainers' GPUs", wide_jobs),
    ] if any((d.get("data") or {}).get("BD3LM_TRAIN_DEVICE") == "cuda" for d in docs if d.get("kind") == "ConfigMap") else []) + ([
        ("the HTTP API on a port the container lacks", http_port),
        ("an Ingress to a port its Service lacks", ingress_port),
    ] if any(d.get("kind") == "Ingress" for d in docs) else []) + ([
        ("a worker pool the coordinators do not resolve", unresolved_pool),
        ("a model's tokenizer on no mounted volume", unmounted_tokenizer),
    ] if any(
        "BD3LM_MODEL_TOKENIZERS" in (d.get("data") or {}) for d in docs if d.get("kind") == "ConfigMap"
    ) else []) + ([
        ("the HTTP API's port closed by the NetworkPolicy", http_closed),
    ] if policies and any(d.get("kind") == "Ingress" for d in docs) else [])


def main(argv):
    self_test = argv[:1] == ["--self-test"]
    if self_test:
        argv = argv[1:]
    if not argv:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    docs, provided = load(argv[0]), provided_secrets(argv[1:])
    faults = check(docs, provided)
    for fault in faults:
        print(f"{argv[0]}: {fault}")
    if faults:
        return 1
    if self_test:
        missed = []
        for what, how in breaks(docs):
            broken = copy.deepcopy(docs)
            how(broken)
            if not check(broken, provided):
                missed.append(what)
        for what in missed:
            print(f"{argv[0]}: self-test: not found: {what}")
        if missed:
            return 1
        print(f"{argv[0]}: wiring ok; each of {len(breaks(docs))} breaks is found")
    else:
        print(f"{argv[0]}: wiring ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
