#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (the real llama.cpp peer) into $SURGE_PEERS/llama.cpp/bin/.
#
#   benchmarks/peers/build_llama_server.sh            # skips if the binary is already there and runs
#   FORCE=1 benchmarks/peers/build_llama_server.sh    # rebuild
#
# The source comes from the llama-cpp-python sdist on PyPI (this machine reaches package
# registries only, not GitHub): `pip download --no-deps --no-binary :all: llama-cpp-python`,
# whose vendor/llama.cpp is a full llama.cpp tree. cmake builds only the llama-server target,
# Release, native CPU flags (GGML_NATIVE, the default), static libs (one self-contained binary),
# no curl, no OpenSSL, and no web UI (LLAMA_BUILD_UI=OFF, LLAMA_USE_PREBUILT_UI=OFF: otherwise the
# build tries to download the UI from a Hugging Face bucket).
#
# Env: SURGE_PEERS (default ~/.cache/surge/peers), JOBS (default 2), NICE (default 19),
#      LLAMA_CPP_PYTHON_VERSION (pin the sdist, e.g. 0.3.36; default: latest), PYTHON (default python3),
#      KEEP_BUILD=1 keeps the ~250 MB build tree (default: removed after a successful install).
# Takes ~1 min download + ~8 min compile on 2 cores; ~75 MB sdist + ~300 MB source tree kept.
set -euo pipefail

PEERS="${SURGE_PEERS:-$HOME/.cache/surge/peers}"
DEST="$PEERS/llama.cpp"
BIN="$DEST/bin/llama-server"
JOBS="${JOBS:-2}"
NICE="${NICE:-19}"
PYTHON="${PYTHON:-python3}"
SPEC="llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==$LLAMA_CPP_PYTHON_VERSION}"

log() { echo "[build_llama_server] $*"; }
die() { echo "[build_llama_server] ERROR: $*" >&2; exit 1; }

if [[ -x "$BIN" && -z "${FORCE:-}" ]]; then
    if "$BIN" --version >/dev/null 2>&1; then
        log "$BIN already built; skipping (FORCE=1 rebuilds)"
        "$BIN" --version 2>&1 | sed 's/^/[build_llama_server]   /'
        exit 0
    fi
    log "$BIN exists but does not run; rebuilding"
fi

for tool in cmake c++ tar; do
    command -v "$tool" >/dev/null || die "'$tool' not found; install it (e.g. apt-get install cmake g++)"
done
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)

start=$(date +%s)
mkdir -p "$DEST/sdist" "$DEST/bin"

# --- 1. source: the llama-cpp-python sdist ---
sdist=$(ls -t "$DEST"/sdist/llama_cpp_python-*.tar.gz 2>/dev/null | head -n1 || true)
if [[ -n "${LLAMA_CPP_PYTHON_VERSION:-}" && -n "$sdist" && "$sdist" != *"-$LLAMA_CPP_PYTHON_VERSION.tar.gz" ]]; then
    sdist=""
fi
if [[ -z "$sdist" ]]; then
    log "downloading the $SPEC sdist (pip download --no-deps --no-binary :all:)"
    "$PYTHON" -m pip download --no-deps --no-binary :all: -d "$DEST/sdist" "$SPEC" \
        || die "pip could not download the $SPEC sdist"
    sdist=$(ls -t "$DEST"/sdist/llama_cpp_python-*.tar.gz 2>/dev/null | head -n1 || true)
    [[ -n "$sdist" ]] || die "pip downloaded no llama_cpp_python-*.tar.gz into $DEST/sdist"
else
    log "using the already downloaded $(basename "$sdist")"
fi
name=$(basename "$sdist" .tar.gz)               # llama_cpp_python-X.Y.Z
SRC="$DEST/src/$name/vendor/llama.cpp"
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    log "extracting $(basename "$sdist") into $DEST/src"
    rm -rf "$DEST/src/$name"
    mkdir -p "$DEST/src"
    tar -xzf "$sdist" -C "$DEST/src"
    [[ -f "$SRC/CMakeLists.txt" ]] || die "no vendor/llama.cpp/CMakeLists.txt in $(basename "$sdist")"
fi

# --- 2. configure + build only llama-server ---
BUILD="$DEST/build"
log "configuring $SRC (Release, native, static, no curl/openssl/web UI) in $BUILD"
nice -n "$NICE" cmake -S "$SRC" -B "$BUILD" "${GENERATOR[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TOOLS=ON \
    || die "cmake configure failed (see above)"
log "building target llama-server with $JOBS jobs at nice $NICE (~8 min on 2 cores)"
nice -n "$NICE" cmake --build "$BUILD" --config Release --target llama-server -j "$JOBS" \
    || die "cmake build failed (see above)"

built=$(find "$BUILD" -type f -name llama-server -perm -u+x | head -n1)
[[ -n "$built" ]] || die "the build produced no llama-server binary under $BUILD"
install -m 0755 "$built" "$BIN.tmp" && mv -f "$BIN.tmp" "$BIN"
"$BIN" --version >/dev/null 2>&1 || die "$BIN was built but '--version' fails"
echo "$name" > "$DEST/SOURCE"
if [[ -z "${KEEP_BUILD:-}" ]]; then
    log "removing the build tree $BUILD (KEEP_BUILD=1 keeps it)"
    rm -rf "$BUILD"
fi
log "installed $BIN in $(( $(date +%s) - start )) s"
"$BIN" --version 2>&1 | sed 's/^/[build_llama_server]   /'
