#!/usr/bin/env bash
# Runs the README's Python client (tests/python/client.py) against `bd3lm serve`: a
# virtual environment with grpcio and grpcio-tools from the package registry, stubs
# generated from proto/, the debug build of bd3lm serving the demo model on a free port.
set -euo pipefail
cd "$(dirname "$0")/../.."

work=$(mktemp -d)
server=
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q grpcio grpcio-tools
mkdir "$work/stubs"
"$work/venv/bin/python" -m grpc_tools.protoc -Iproto --python_out="$work/stubs" \
    --grpc_python_out="$work/stubs" proto/bd3lm/v1/*.proto
touch "$work/stubs/bd3lm/__init__.py" "$work/stubs/bd3lm/v1/__init__.py"

port=$("$work/venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
BD3LM_THREADS=2 target/debug/bd3lm serve --addr "127.0.0.1:$port" >"$work/serve.log" 2>&1 &
server=$!
# The client waits for the server's readiness (bounded); a failure shows the server's log.
BD3LM_STUBS="$work/stubs" timeout 300 "$work/venv/bin/python" tests/python/client.py "127.0.0.1:$port" ||
    { cat "$work/serve.log" >&2; exit 1; }
