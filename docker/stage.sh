#!/usr/bin/env bash
# Stages what the images hold under DEST, as the image's root: the four binaries in
# usr/local/bin and the demo model (the default checkpoint) in opt/bd3lm/models/demo.
# The Dockerfiles' build stages run it; CI runs it on its debug build and starts the
# staged `bd3lm` (no container builder here can pull a base image).
#
#   docker/stage.sh DEST                 # cargo build --release, then stage
#   docker/stage.sh --cuda DEST          # the worker and bd3lm with candle's CUDA backend
#                                        # (scripts/build-cuda.sh), the coordinator without
#   PROFILE=dev BUILD=0 docker/stage.sh DEST   # stage an existing debug build
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cuda=0
if [ "${1:-}" = --cuda ]; then
    cuda=1
    shift
fi
dest=${1:?usage: docker/stage.sh [--cuda] DEST}
profile=${PROFILE:-release}
case $profile in
    dev) out=debug ;;
    *) out=$profile ;;
esac
cd "$root"

if [ "${BUILD:-1}" = 1 ]; then
    if [ "$cuda" = 1 ]; then
        # The coordinator never runs the network: it needs no CUDA.
        scripts/build-cuda.sh --locked -p bd3lm-worker -p bd3lm-trainer
        cargo build --locked --profile "$profile" -p bd3lm-coordinator
    else
        cargo build --locked --profile "$profile" -p bd3lm -p bd3lm-worker -p bd3lm-coordinator \
            -p bd3lm-trainer
    fi
fi

# A release binary's line tables (for backtraces) are five sixths of its size: the
# image's copies are stripped.
strip=()
[ "$profile" = release ] && strip=(--strip)
for bin in bd3lm bd3lm-worker bd3lm-coordinator bd3lm-trainer; do
    install -D -m 0755 "${strip[@]}" "target/$out/$bin" "$dest/usr/local/bin/$bin"
done
model=$dest/opt/bd3lm/models/demo
for file in config.json model.safetensors tokenizer.json README.md; do
    install -D -m 0644 "services/bd3lm/demo-model/$file" "$model/$file"
done
echo "staged into $dest"
