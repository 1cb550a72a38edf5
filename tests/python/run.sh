#!/usr/bin/env bash
# Runs the README's Python client (tests/python/client.py) against `bd3lm serve`, then the
# official `openai` package (tests/python/openai_client.py) against a second `bd3lm
# serve` with the HTTP API and an API key: a virtual environment with grpcio,
# grpcio-tools and openai from the package registry, stubs generated from proto/, the
# debug build of bd3lm serving the demo model on free ports.
set -euo pipefail
cd "$(dirname "$0")/../.."

work=$(mktemp -d)
servers=()
cleanup() {
    for server in "${servers[@]}"; do
        kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    done
    rm -rf "$work"
}
trap cleanup EXIT

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q grpcio grpcio-tools openai
mkdir "$work/stubs"
"$work/venv/bin/python" -m grpc_tools.protoc -Iproto --python_out="$work/stubs" \
    --grpc_python_out="$work/stubs" proto/bd3lm/v1/*.proto
touch "$work/stubs/bd3lm/__init__.py" "$work/stubs/bd3lm/v1/__init__.py"

free_port() {
    "$work/venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
export PYTHONPATH=tests/python BD3LM_STUBS="$work/stubs"

port=$(free_port)
BD3LM_THREADS=2 target/debug/bd3lm serve --addr "127.0.0.1:$port" >"$work/serve.log" 2>&1 &
servers+=($!)
# The client waits for the server's readiness (bounded); a failure shows the server's log.
timeout 300 "$work/venv/bin/python" tests/python/client.py "127.0.0.1:$port" ||
    { cat "$work/serve.log" >&2; exit 1; }
kill "${servers[0]}" && wait "${servers[0]}" 2>/dev/null || true

key=openai-test-key-0123456789
echo "$key" >"$work/api-keys"
grpc_port=$(free_port)
http_port=$(free_port)
BD3LM_THREADS=2 target/debug/bd3lm serve --addr "127.0.0.1:$grpc_port" \
    --http-addr "127.0.0.1:$http_port" --api-keys "$work/api-keys" --max-streams-per-key 1 \
    >"$work/serve-http.log" 2>&1 &
servers+=($!)
timeout 600 "$work/venv/bin/python" tests/python/openai_client.py \
    "127.0.0.1:$http_port" "127.0.0.1:$grpc_port" "$key" ||
    { cat "$work/serve-http.log" >&2; exit 1; }
