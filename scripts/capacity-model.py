#!/usr/bin/env python3
"""The store's capacity model (docs/scaling.md), calibrated and checked on the runs of
scripts/measure-capacity.sh (JSON lines on stdin), then projected to the GPU goals.

Per generated block of one stream, from the code's path (a worker reads the record with
every token, a commit writes the block's tokens, its KV blob and the record; the
coordinator's reads, lease and record writes are once per generation):
  bytes in  = f * (blob + w) + c_in
  bytes out = 4 * n + c_out          (n: the session's tokens, read with the record)
  requests  = q                      (scripts and blob reads)
  Redis CPU = a + b * bytes in       (per topology: a master with a replica sends the
                                      replication stream too)
  coordinator CPU = c                (it never touches blobs)
where f is the share of blocks whose blob is written (1 every block, 0 never, window /
generation length at the end for generations past the window), blob = block size *
layers * 2 * hidden * bytes per value + h, and w the blob's key and framing. The
constants come from the single node's f32 runs (a and b of the cluster from the
cluster's f32 runs); every other run checks them.
"""
import json
import sys

SHAPES = {  # hidden, layers, block size, window (context)
    "tiny": (256, 8, 4, 1024),
    "demo": (256, 4, 4, 256),
    "small": (768, 12, 4, 1024),
}
BYTES = {"f32": 4, "bf16": 2, "f16": 2}
GOAL_TOKENS_PER_S = 10_000  # per GPU
GOAL_STREAMS = 64  # live sessions per GPU


def payload(shape, kv):
    d, layers, bs, _ = SHAPES[shape]
    return bs * layers * 2 * d * BYTES[kv]


def per_block(run):
    blocks = run["concurrency"] * run["tokens"] / SHAPES["demo"][2]
    total = {k: sum(m[k] for m in run["masters"]) for k in run["masters"][0]}
    shares = [m["in"] / total["in"] for m in run["masters"]]
    return {
        "in": total["in"] / blocks,
        "out": (total["out"] - total["repl_out"]) / blocks,
        "requests": total["requests"] / blocks,
        "redis_cpu_us": total["cpu_s"] / blocks * 1e6,
        "coordinator_cpu_us": run["coordinator_cpu_s"] / blocks * 1e6,
        "commands": total["commands"] / blocks,
        "replication_out": total["repl_out"] / blocks,
        "busiest_master_share": max(shares),
    }


def mean_tokens(run):
    return run["prompt"] + run["tokens"] / 2


def find(runs, store, persistence):
    return next(r for r in runs if r["store"] == store and r["kv_dtype"] == "f32"
                and r["persistence"] == persistence)


def cpu_line(runs, store):
    full, bare = per_block(find(runs, store, "every-block")), per_block(find(runs, store, "never"))
    b = (full["redis_cpu_us"] - bare["redis_cpu_us"]) / (full["in"] - bare["in"])
    return bare["redis_cpu_us"] - b * bare["in"], b


def calibrate(runs):
    full, bare = find(runs, "single", "every-block"), find(runs, "single", "never")
    pf, pb = per_block(full), per_block(bare)
    model = {
        "h": full["blob_bytes"] - payload("demo", "f32"),
        "w": pf["in"] - pb["in"] - full["blob_bytes"],
        "c_in": pb["in"],
        "c_out": pf["out"] - 4 * mean_tokens(full),
        "q": pf["requests"],
        "c_us": pf["coordinator_cpu_us"],
    }
    for store in ("single", "cluster"):
        model[f"a_us_{store}"], model[f"b_us_per_byte_{store}"] = cpu_line(runs, store)
    return model


def bytes_in(model, shape, kv, share):
    return share * (payload(shape, kv) + model["h"] + model["w"]) + model["c_in"]


def redis_cpu_us(model, store, into):
    return model[f"a_us_{store}"] + model[f"b_us_per_byte_{store}"] * into


def predict(model, run):
    into = bytes_in(model, "demo", run["kv_dtype"], 0.0 if run["persistence"] == "never" else 1.0)
    return {
        "in": into,
        "out": 4 * mean_tokens(run) + model["c_out"],
        "requests": model["q"],
        "redis_cpu_us": redis_cpu_us(model, run["store"], into),
        "coordinator_cpu_us": model["c_us"],
    }


def check(model, runs):
    worst = {}
    for run in runs:
        measured, predicted = per_block(run), predict(model, run)
        ratios = {k: measured[k] / predicted[k] for k in predicted}
        for k, r in ratios.items():
            worst[k] = max(worst.get(k, 0.0), abs(r - 1))
        print(json.dumps({
            "store": run["store"], "kv_dtype": run["kv_dtype"],
            "persistence": run["persistence"], "wall_s": run["wall_s"],
            "measured_per_block": {k: round(v, 3) for k, v in measured.items()},
            "predicted_per_block": {k: round(v, 3) for k, v in predicted.items()},
            "measured_over_predicted": {k: round(v, 3) for k, v in ratios.items()},
        }))
    return worst


def project(model):
    """Per GPU at the goals, for each shape, precision and persistence, on shards with a
    replica each (the cluster's CPU line)."""
    for shape, (d, layers, bs, window) in SHAPES.items():
        blocks_per_s = GOAL_TOKENS_PER_S / bs
        for kv in ("f32", "bf16"):
            per_token = (payload(shape, kv) + model["h"]) / bs
            for persistence, share in (("every-block", 1.0), ("at-end, 4 windows", 0.25),
                                       ("never", 0.0)):
                into = bytes_in(model, shape, kv, share)
                cpu = redis_cpu_us(model, "cluster", into)
                session = window * per_token * (share > 0) + 4 * window
                print(json.dumps({
                    "shape": shape, "kv_dtype": kv, "persistence": persistence,
                    "blob_bytes_per_token": round(per_token),
                    "store_mb_per_live_session": round(session / 1e6, 3),
                    "store_gb_per_gpu_64_sessions": round(GOAL_STREAMS * session / 1e9, 3),
                    "store_bytes_in_per_block": round(into),
                    "store_mb_per_s_per_gpu": round(blocks_per_s * into / 1e6, 1),
                    "store_requests_per_s_per_gpu": round(blocks_per_s * model["q"]),
                    "redis_cores_per_gpu": round(blocks_per_s * cpu / 1e6, 3),
                    "coordinator_cores_per_gpu": round(blocks_per_s * model["c_us"] / 1e6, 3),
                }))


def main():
    runs = [json.loads(line) for line in sys.stdin if line.strip()]
    model = calibrate(runs)
    print(json.dumps({"model": {k: round(v, 5) for k, v in model.items()}}))
    worst = check(model, runs)
    print(json.dumps({"worst_deviation": {k: round(v, 3) for k, v in worst.items()}}))
    project(model)


if __name__ == "__main__":
    main()
