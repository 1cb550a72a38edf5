#!/usr/bin/env bash
# Store bytes per generated token under each KV persistence and KV precision: `bd3lm
# serve` (the demo model, two workers) on a redis-server of its own, one generation of N
# tokens per (precision, persistence, N), and the bytes Redis received for it (the delta
# of INFO's total_net_input_bytes: tokens, records, leases, blobs, the commands around
# them) with the blobs it holds afterwards. One JSON line each.
#
#   scripts/measure-persistence.sh [TOKENS...]   # default: 256 1024
#
# Needs a release build (cargo build --release -p bd3lm) and redis-server on the PATH.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$root/target/release/bd3lm
[ -x "$bin" ] || { echo "error: build first: cargo build --release -p bd3lm" >&2; exit 2; }
lengths=("${@:-256 1024}")
read -r -a lengths <<<"${lengths[*]}"
work=$(mktemp -d)
redis_port=6393
addr=127.0.0.1:50093
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
redis-server --port "$redis_port" --save '' --appendonly no --dir "$work" \
    --logfile "$work/redis.log" --daemonize yes
until redis-cli -p "$redis_port" ping >/dev/null 2>&1; do sleep 0.1; done
received() { redis-cli -p "$redis_port" info stats | tr -d '\r' | sed -n 's/^total_net_input_bytes://p'; }

for kv in f32 bf16; do
    BD3LM_THREADS=2 "$bin" serve --addr "$addr" --redis "redis://127.0.0.1:$redis_port" \
        --kv-dtype "$kv" >"$work/serve-$kv.log" 2>&1 &
    pids+=($!)
    until "$bin" generate --addr "$addr" --prompt-ids 1 --max-tokens 4 --seed 0 >/dev/null 2>&1; do
        sleep 0.5
    done
    for tokens in "${lengths[@]}"; do
        for persistence in every-block at-end never; do
            before=$(received)
            session=$("$bin" generate --addr "$addr" --prompt "The state of the Union" \
                --max-tokens "$tokens" --seed 7 --kv-persistence "$persistence" 2>&1 >/dev/null |
                sed -n 's/.*session \([0-9a-f]*\).*/\1/p')
            after=$(received)
            blobs=$(redis-cli -p "$redis_port" --scan --pattern "*{$session}:kv:*" | wc -l)
            printf '{"kv_dtype":"%s","persistence":"%s","tokens":%s,"store_bytes_received":%s,"bytes_per_token":%s,"blobs_held":%s}\n' \
                "$kv" "$persistence" "$tokens" "$((after - before))" "$(((after - before) / tokens))" "$blobs"
        done
    done
    kill "${pids[-1]}"
    wait "${pids[-1]}" 2>/dev/null || true
done
