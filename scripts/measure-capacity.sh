#!/usr/bin/env bash
# The capacity model's inputs and its check (docs/scaling.md): the real coordinator and
# two workers (the demo model) with their sessions on a local Redis Cluster of three
# masters with a replica each, then on a single redis-server; CONCURRENCY generations of
# TOKENS tokens at once per KV precision and persistence. Per block it measures what the
# masters received and sent (INFO's total_net_input_bytes, total_net_output_bytes), the
# commands they ran, the replication stream, the coordinator's CPU time (/proc), and how
# evenly the masters shared the load. One JSON line per run, then the model calibrated
# on the single node's first run (scripts/capacity-model.py) against every run.
#
#   scripts/measure-capacity.sh [CONCURRENCY] [TOKENS]   # default: 8 512
#
# Needs a release build (cargo build --release --workspace --bins) and redis-server and
# redis-cli on the PATH. Ports 30000-30006 (cluster bus +10000) and 50095-50097.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release
for b in bd3lm bd3lm-coordinator bd3lm-worker; do
    [ -x "$bin/$b" ] || { echo "error: build first: cargo build --release --workspace --bins" >&2; exit 2; }
done
concurrency=${1:-8}
tokens=${2:-512}
work=$(mktemp -d)
single=30000
masters_and_replicas=(30001 30002 30003 30004 30005 30006)
coordinator=127.0.0.1:50095
workers=(127.0.0.1:50096 127.0.0.1:50097)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for port in "$single" "${masters_and_replicas[@]}"; do
        redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

start_redis() { # port, extra flags...
    local port=$1
    shift
    mkdir -p "$work/$port"
    redis-server --port "$port" --save '' --appendonly no --dir "$work/$port" \
        --logfile "$work/$port/redis.log" --daemonize yes "$@"
    until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done
}
start_redis "$single"
for port in "${masters_and_replicas[@]}"; do
    start_redis "$port" --cluster-enabled yes --cluster-config-file nodes.conf \
        --cluster-node-timeout 2000
done
nodes=()
for port in "${masters_and_replicas[@]}"; do nodes+=("127.0.0.1:$port"); done
redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
until redis-cli -p 30001 cluster info | grep -q cluster_state:ok; do sleep 0.2; done
sleep 1

# The masters now (a replica's port is never a master's here: no failover is provoked).
masters() {
    if [ "$1" = single ]; then echo "$single"; return; fi
    redis-cli -p 30001 cluster nodes | awk '/master/ && !/fail/ {split($2, a, "[:@]"); print a[2]}'
}
# "in out commands repl_out cpu_s requests" of one server: bytes received and sent (the
# replication stream included), commands (those scripts run included), bytes sent to
# replicas, CPU seconds, and the requests of the session store (scripts and blob reads).
counters() {
    redis-cli -p "$1" info all | tr -d '\r' | awk -F: '
        /^total_net_input_bytes:/ {i=$2} /^total_net_output_bytes:/ {o=$2}
        /^total_commands_processed:/ {c=$2} /^total_net_repl_output_bytes:/ {r=$2}
        /^used_cpu_sys:/ {s=$2} /^used_cpu_user:/ {u=$2}
        /^cmdstat_(evalsha|mget):/ {split($2, a, "[=,]"); q += a[2]}
        END {printf "%d %d %d %d %.6f %d\n", i, o, c, r, s + u, q}'
}
# CPU seconds of every thread of a process (ns-precise, unlike /proc/PID/stat's ticks).
cpu_s() { cat /proc/"$1"/task/*/schedstat | awk '{ns += $1} END {printf "%.6f\n", ns / 1e9}'; }
# The bytes of one KV blob the masters hold (0 when none).
blob_bytes() {
    local p key
    for p in "$@"; do
        key=$(redis-cli -p "$p" --scan --pattern '*:kv:*' | head -1)
        if [ -n "$key" ]; then redis-cli -p "$p" strlen "$key"; return; fi
    done
    echo 0
}

run_on() { # store (single|cluster), kv dtype, persistence
    local store=$1 kv=$2 persistence=$3 flags
    if [ "$store" = single ]; then
        flags=(--redis "redis://127.0.0.1:$single")
    else
        flags=(--redis-cluster "redis://127.0.0.1:30001,redis://127.0.0.1:30002,redis://127.0.0.1:30003")
    fi
    local started=()
    for addr in "${workers[@]}"; do
        BD3LM_THREADS=1 "$bin/bd3lm-worker" --addr "$addr" \
            --checkpoint "$root/services/bd3lm/demo-model" --kv-dtype "$kv" "${flags[@]}" \
            >"$work/worker-$kv-$store-${addr##*:}.log" 2>&1 &
        started+=($!)
    done
    "$bin/bd3lm-coordinator" --addr "$coordinator" --workers "$(IFS=,; echo "${workers[*]}")" \
        --kv-persistence "$persistence" "${flags[@]}" >"$work/coordinator-$kv-$store.log" 2>&1 &
    local coordinator_pid=$!
    started+=("$coordinator_pid")
    pids+=("${started[@]}")
    until "$bin/bd3lm" generate --addr "$coordinator" --prompt-ids 1 --max-tokens 4 --seed 0 \
        >/dev/null 2>&1; do sleep 0.5; done
    local ports idle=() before=() after=()
    mapfile -t ports < <(masters "$store")
    # What the servers do with no generation running (health probes, the cluster bus),
    # over 2 s, is taken off the run's figures at the same rate.
    for p in "${ports[@]}"; do idle+=("$(counters "$p")"); done
    sleep 2
    local idle_s=2
    for p in "${ports[@]}"; do before+=("$(counters "$p")"); done
    local cpu_before cpu_after clients=() t0 t1
    t0=$(date +%s.%N)
    cpu_before=$(cpu_s "$coordinator_pid")
    for i in $(seq 1 "$concurrency"); do
        "$bin/bd3lm" generate --addr "$coordinator" --prompt-ids "$prompt" \
            --max-tokens "$tokens" --seed "$i" >/dev/null 2>"$work/client-$i.log" &
        clients+=($!)
    done
    for c in "${clients[@]}"; do wait "$c" || { cat "$work/client-"*.log >&2; exit 1; }; done
    cpu_after=$(cpu_s "$coordinator_pid")
    for p in "${ports[@]}"; do after+=("$(counters "$p")"); done
    t1=$(date +%s.%N)
    local blob
    blob=$(blob_bytes "${ports[@]}")
    kill "${started[@]}" 2>/dev/null || true
    wait "${started[@]}" 2>/dev/null || true
    # Clean slate for the next run's blob size.
    for p in "${ports[@]}"; do redis-cli -p "$p" flushall >/dev/null; done
    python3 - "$store" "$kv" "$persistence" "$concurrency" "$tokens" "$prompt_len" \
        "$cpu_before" "$cpu_after" "$blob" "$idle_s" "$t0" "$t1" \
        "${idle[@]}" -- "${before[@]}" -- "${after[@]}" <<'PY'
import json, sys
store, kv, persistence, conc, tokens, prompt, c0, c1, blob, idle_s, t0, t1 = sys.argv[1:13]
wall = float(t1) - float(t0)
rest = " ".join(sys.argv[13:]).split(" -- ")
idle, before, after = [[float(x) for x in part.split()] for part in rest]
keys = ["in", "out", "commands", "repl_out", "cpu_s", "requests"]
n = len(keys)
masters = []
for m in range(len(idle) // n):
    i, b, a = (v[m * n:(m + 1) * n] for v in (idle, before, after))
    rate = [(y - x) / float(idle_s) for x, y in zip(i, b)]
    masters.append({k: round(y - x - r * wall, 6)
                    for k, x, y, r in zip(keys, b, a, rate)})
print(json.dumps({
    "store": store, "kv_dtype": kv, "persistence": persistence,
    "concurrency": int(conc), "tokens": int(tokens), "prompt": int(prompt),
    "blob_bytes": int(blob), "wall_s": round(wall, 3),
    "coordinator_cpu_s": round(float(c1) - float(c0), 6), "masters": masters,
}))
PY
}

prompt=17,42,99,256,512,1000,4000,8000
prompt_len=8
for store in single cluster; do
    for kv in f32 bf16; do
        for persistence in every-block never; do
            [ "$kv" = bf16 ] && [ "$persistence" = never ] && continue
            run_on "$store" "$kv" "$persistence"
        done
    done
done | tee "$work/runs.jsonl"
python3 "$root/scripts/capacity-model.py" <"$work/runs.jsonl"
