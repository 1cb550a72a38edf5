#!/usr/bin/env bash
# Builds the `bd3lm` binaries with candle's CUDA backend on a machine without a GPU or a
# system CUDA toolkit: the CUDA 13.0 toolkit comes from NVIDIA's PyPI wheels (about
# 670 MB, kept in .cuda/ and reused), the driver library from a link-time stub generated
# from cuda.h. Run the result on a host whose driver supports CUDA 13 with LD_LIBRARY_PATH
# pointing at its CUDA 13 runtime libraries (libcublas.so.13, libcublasLt.so.13,
# libcurand.so.10, libcudart.so.13).
#
#   scripts/build-cuda.sh            # cargo build --release --features cuda -p bd3lm,
#                                    # then dist/bd3lm-cuda.gz for the GPU host
#   CUDA_COMPUTE_CAP=80 scripts/build-cuda.sh   # another GPU generation (default 90: H100)
#   NCCL=1 scripts/build-cuda.sh     # also NCCL (feature nccl: the data-parallel trainer's
#                                    # all-reduce across GPUs), from NVIDIA's NCCL wheel;
#                                    # the GPU host then needs libnccl.so.2 too
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
toolkit=${CUDA_WHEELS_DIR:-$root/.cuda}
cu=$toolkit/nvidia/cu13
lib=$cu/lib

if [ ! -x "$cu/bin/nvcc" ]; then
    mkdir -p "$toolkit/wheels"
    # nvcc stays at 13.0: the GPU hosts' driver is CUDA 13.0.
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$toolkit/wheels" \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
        nvidia-curand==10.4.0.35 nvidia-cublas==13.0.0.19
    for wheel in "$toolkit"/wheels/*.whl; do
        python3 -m zipfile -e "$wheel" "$toolkit"
    done
    chmod +x "$cu"/bin/* "$cu"/nvvm/bin/* 2>/dev/null || true
fi

features=cuda
if [ "${NCCL:-0}" = 1 ]; then
    nccl=$toolkit/nvidia/nccl/lib
    if [ ! -f "$nccl/libnccl.so.2" ]; then
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.11 \
            --platform manylinux_2_18_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux_2_17_x86_64 -d "$toolkit/nccl-wheel" nvidia-nccl-cu13==2.27.7
        python3 -m zipfile -e "$toolkit"/nccl-wheel/*.whl "$toolkit"
    fi
    ln -sf libnccl.so.2 "$nccl/libnccl.so"
    export LIBRARY_PATH=$nccl${LIBRARY_PATH:+:$LIBRARY_PATH}
    features="cuda nccl"
fi

# Unversioned names for the linker.
for name in cublas cublasLt nvrtc cudart; do
    ln -sf "lib$name.so.13" "$lib/lib$name.so"
done
ln -sf libcurand.so.10 "$lib/libcurand.so"

# The wheels carry no driver library: link against a stub exporting every cu* function
# of cuda.h (after macro expansion, so the _v2 names are the ones exported).
if [ ! -f "$lib/stubs/libcuda.so" ]; then
    mkdir -p "$lib/stubs"
    gcc -E -P -I"$cu/include" "$cu/include/cuda.h" \
        | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | sed 's/[[:space:]]*($//' | sort -u \
        | awk '{ print "int " $1 "(void) { return 0; }" }' > "$lib/stubs/libcuda.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/stubs/libcuda.so" "$lib/stubs/libcuda.c"
fi

export CUDA_HOME=$cu
export CUDA_ROOT=$cu
export PATH=$cu/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH=$lib:$lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
cd "$root"
cargo build --release --features "$features" -p bd3lm "$@"

# What travels to a GPU host (scripts/gpu-check.sh reads it): the binary stripped of its
# debug info and compressed, about 34 MB.
mkdir -p dist
strip -o dist/bd3lm-cuda target/release/bd3lm
gzip -9 -f dist/bd3lm-cuda
echo "dist/bd3lm-cuda.gz: carry it to the GPU host and run scripts/gpu-check.sh there"
