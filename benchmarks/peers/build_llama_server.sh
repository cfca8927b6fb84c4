#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (the real llama.cpp peer) and `llama-perplexity` (a perplexity
# reference) into $SURGE_PEERS/llama.cpp/bin/, then smoke-test the server for real.
#
#   benchmarks/peers/build_llama_server.sh            # skips if both binaries are there and the smoke test passes
#   FORCE=1 benchmarks/peers/build_llama_server.sh    # rebuild
#
# The source comes from the llama-cpp-python sdist on PyPI (this machine reaches package
# registries only, not GitHub): `pip download --no-deps --no-binary :all: llama-cpp-python`,
# whose vendor/llama.cpp is a full llama.cpp tree. One cmake build makes the two targets
# llama-server and llama-perplexity: Release, static libs (self-contained binaries), no curl, no
# OpenSSL, and no web UI (LLAMA_BUILD_UI=OFF, LLAMA_USE_PREBUILT_UI=OFF: otherwise the build tries
# to download the UI from a Hugging Face bucket).
#
# CPU flags (ARCH=auto, the default): read from /proc/cpuinfo.
#   - CPU without AMX: GGML_NATIVE=ON (-march=native), as before.
#   - CPU with AMX (amx_tile in the flags): GGML_NATIVE=OFF plus the explicit ISA options the CPU
#     has (SSE4.2, AVX, AVX2, BMI2, FMA, F16C, AVX-512 F/CD/VL/DQ/BW, AVX512-VBMI, AVX512-VNNI,
#     AVX512-BF16, AVX-VNNI) and GGML_AMX_TILE/INT8/BF16 OFF. Why: the -march=native build of this
#     llama.cpp (llama-cpp-python 0.3.36, ggml 0.25.3) with GCC 12.2 on the 2-core Xeon (Emerald
#     Rapids, AMX) dev machine dies with SIGILL at startup, on `tilezero %tmm4` in
#     tinygemm_kernel_amx (the AMX Q4_1 matmul of the warm-up decode). It is not the AMX
#     permission: this llama.cpp asks for the tile state itself (ggml/src/ggml-cpu/amx/amx.cpp,
#     ggml_amx_init(): arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)), and the call
#     returns 0 here. The cause is GCC 12's _tile_loadconfig intrinsic, whose asm declares an
#     8-byte memory input only: GCC drops the stores of the tile rows/colsb, so ldtilecfg loads
#     "palette 1, every tile 0x0" and the first tile instruction raises #UD. AMX off avoids that
#     code; the AVX-512 (VNNI/BF16) kernels serve the same requests. ARCH=native forces
#     -march=native (e.g. with a compiler without that bug); ARCH=explicit forces the explicit
#     flags on any x86 CPU.
#
# The smoke test (every run, also when the build is skipped): start llama-server on the bundled
# model's GGUF (`surge.models.default_model.pull_default_model()`, or MODEL=/path/to.gguf) on
# 127.0.0.1, wait for /health, send one completion, check the server is still alive, stop it by
# PID. If the server dies, the script names the signal (e.g. SIGILL) and prints the log tail.
# Then llama-perplexity runs one short chunk on a generated text and must print a PPL.
#
# Env: SURGE_PEERS (default ~/.cache/surge/peers), JOBS (default 2), NICE (default 19),
#      ARCH (auto|native|explicit; default auto), MODEL (GGUF for the smoke test),
#      LLAMA_CPP_PYTHON_VERSION (pin the sdist, e.g. 0.3.36; default: latest), PYTHON (default python3),
#      KEEP_BUILD=1 keeps the build tree (default: removed after a successful install).
# Takes ~1 min download + ~9 min compile on 2 cores; ~75 MB sdist + ~220 MB source tree kept.
set -euo pipefail

PEERS="${SURGE_PEERS:-$HOME/.cache/surge/peers}"
DEST="$PEERS/llama.cpp"
BIN="$DEST/bin/llama-server"
PPL_BIN="$DEST/bin/llama-perplexity"
JOBS="${JOBS:-2}"
NICE="${NICE:-19}"
ARCH="${ARCH:-auto}"
PYTHON="${PYTHON:-python3}"
SPEC="llama-cpp-python${LLAMA_CPP_PYTHON_VERSION:+==$LLAMA_CPP_PYTHON_VERSION}"

log() { echo "[build_llama_server] $*"; }
die() { echo "[build_llama_server] ERROR: $*" >&2; exit 1; }

# --- the smoke test -------------------------------------------------------------------------

SERVER_PID=""
SMOKE_DIR=""
cleanup() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    [[ -n "$SMOKE_DIR" ]] && rm -rf "$SMOKE_DIR"
    return 0
}
trap cleanup EXIT

# The GGUF to smoke-test with: $MODEL, else the bundled default model (downloaded on first use).
smoke_model() {
    if [[ -n "${MODEL:-}" ]]; then
        [[ -f "$MODEL" ]] || die "MODEL=$MODEL is not a file"
        echo "$MODEL"
        return
    fi
    local path
    path=$("$PYTHON" -c 'from surge.models.default_model import pull_default_model; print(pull_default_model())' 2>/dev/null) \
        || die "could not locate the bundled GGUF with $PYTHON (is surge installed there?); set MODEL=/path/to/model.gguf"
    [[ -f "$path" ]] || die "the bundled GGUF $path is not a file; set MODEL=/path/to/model.gguf"
    echo "$path"
}

# Explain how a child ended: "exit N" or "signal SIGxxx (N)".
describe_status() {
    local st=$1
    if (( st > 128 )); then
        echo "signal SIG$(kill -l $(( st - 128 )) 2>/dev/null || echo '?') ($(( st - 128 )))"
    else
        echo "exit $st"
    fi
}

# If the server is gone, reap it and die naming the signal. $1: what we were doing.
check_server_alive() {
    kill -0 "$SERVER_PID" 2>/dev/null && return 0
    local st=0
    wait "$SERVER_PID" || st=$?
    SERVER_PID=""
    echo "[build_llama_server] --- last lines of the llama-server log ---" >&2
    tail -n 25 "$SMOKE_DIR/server.log" >&2 || true
    die "smoke test: llama-server died $1 ($(describe_status "$st")); this binary does not run on this machine (see ARCH= in the header)"
}

# GET/POST on 127.0.0.1 with the Python stdlib (no curl needed). Prints the body; fails on non-2xx.
http() {
    "$PYTHON" - "$@" <<'EOF'
import sys, urllib.request
url, body = sys.argv[1], (sys.argv[2].encode() if len(sys.argv) > 2 else None)
req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=float(60)) as r:
    sys.stdout.write(r.read().decode())
EOF
}

smoke_test() {
    local gguf="$SMOKE_GGUF" port out text st i
    SMOKE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/llama-smoke.XXXXXX")
    port=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    log "smoke test: $BIN -m $gguf --host 127.0.0.1 --port $port -c 1024 --parallel 1"
    "$BIN" -m "$gguf" --host 127.0.0.1 --port "$port" -c 1024 --parallel 1 >"$SMOKE_DIR/server.log" 2>&1 &
    SERVER_PID=$!
    for (( i = 0; i < 240; i++ )); do             # up to 120 s (loading a 100 MB GGUF takes ~1 s)
        check_server_alive "while starting"
        http "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
        sleep 0.5
    done
    (( i < 240 )) || die "smoke test: llama-server (pid $SERVER_PID) not healthy after 120 s; log: $(tail -n 5 "$SMOKE_DIR/server.log")"
    if ! out=$(http "http://127.0.0.1:$port/v1/completions" \
            '{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}' 2>"$SMOKE_DIR/http.err"); then
        check_server_alive "during the completion request"
        die "smoke test: the completion request failed: $(tail -n 3 "$SMOKE_DIR/http.err")"
    fi
    text=$("$PYTHON" -c 'import json, sys; r = json.load(sys.stdin); print(r["choices"][0]["text"])' <<<"$out") \
        || die "smoke test: unexpected completion response: ${out:0:300}"
    [[ -n "${text//[[:space:]]/}" ]] || die "smoke test: the completion is empty: ${out:0:300}"
    check_server_alive "after the completion"
    log "smoke test: completion of 'The capital of France is' -> '${text//$'\n'/\\n}'"
    kill -TERM "$SERVER_PID"
    for (( i = 0; i < 40; i++ )); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.25; done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        log "smoke test: llama-server ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$SERVER_PID" 2>/dev/null || true
    fi
    st=0; wait "$SERVER_PID" || st=$?
    SERVER_PID=""
    log "smoke test: llama-server stopped by SIGTERM ($(describe_status "$st")); OK"

    # llama-perplexity: one 128-token chunk of a generated text (needs >= 2 x ctx tokens).
    "$PYTHON" -c 'print(" ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(200)))' \
        >"$SMOKE_DIR/ppl.txt"
    st=0
    "$PPL_BIN" -m "$gguf" -f "$SMOKE_DIR/ppl.txt" -c 128 -b 128 --chunks 1 >"$SMOKE_DIR/ppl.log" 2>&1 || st=$?
    if (( st != 0 )) || ! grep -q "Final estimate: PPL" "$SMOKE_DIR/ppl.log"; then
        tail -n 25 "$SMOKE_DIR/ppl.log" >&2 || true
        die "smoke test: llama-perplexity failed ($(describe_status "$st"))"
    fi
    log "smoke test: llama-perplexity: $(grep -o 'Final estimate: PPL = [^ ]* +/- [^ ]*' "$SMOKE_DIR/ppl.log"); OK"
    rm -rf "$SMOKE_DIR"; SMOKE_DIR=""
}

# --- skip when already built and working ----------------------------------------------------

SMOKE_GGUF=$(smoke_model) || exit 1           # resolve it now: fail before a 9-minute build
if [[ -x "$BIN" && -x "$PPL_BIN" && -z "${FORCE:-}" ]]; then
    if "$BIN" --version >/dev/null 2>&1; then
        log "$BIN and $PPL_BIN already built; smoke-testing them (FORCE=1 rebuilds)"
        [[ -f "$DEST/BUILD_FLAGS" ]] && log "  built with: $(cat "$DEST/BUILD_FLAGS")"
        if ( trap cleanup EXIT; smoke_test ); then
            "$BIN" --version 2>&1 | sed 's/^/[build_llama_server]   /'
            exit 0
        fi
        log "the existing binaries fail the smoke test (see above); rebuilding"
    else
        log "$BIN exists but does not run; rebuilding"
    fi
fi

for tool in cmake c++ tar; do
    command -v "$tool" >/dev/null || die "'$tool' not found; install it (e.g. apt-get install cmake g++)"
done
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)

# --- CPU flags ------------------------------------------------------------------------------

cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2-) "
has() { [[ "$cpu_flags" == *" $1 "* ]]; }
onoff() { if has "$1"; then echo ON; else echo OFF; fi; }
case "$ARCH" in
    auto) if has amx_tile; then ARCH=explicit; else ARCH=native; fi ;;
    native|explicit) ;;
    *) die "ARCH must be auto, native or explicit (got '$ARCH')" ;;
esac
if [[ "$ARCH" == explicit ]]; then
    [[ "$cpu_flags" == *" avx "* || "$cpu_flags" == *" sse4_2 "* ]] || die "ARCH=explicit needs an x86 CPU listed in /proc/cpuinfo"
    avx512=OFF
    if has avx512f && has avx512cd && has avx512vl && has avx512dq && has avx512bw; then avx512=ON; fi
    sub512() { if [[ $avx512 == ON ]]; then onoff "$1"; else echo OFF; fi; }
    ARCH_ARGS=(
        -DGGML_NATIVE=OFF
        -DGGML_SSE42="$(onoff sse4_2)"
        -DGGML_AVX="$(onoff avx)"
        -DGGML_AVX2="$(onoff avx2)"
        -DGGML_BMI2="$(onoff bmi2)"
        -DGGML_FMA="$(onoff fma)"
        -DGGML_F16C="$(onoff f16c)"
        -DGGML_AVX_VNNI="$(onoff avx_vnni)"
        -DGGML_AVX512="$avx512"
        -DGGML_AVX512_VBMI="$(sub512 avx512vbmi)"
        -DGGML_AVX512_VNNI="$(sub512 avx512_vnni)"
        -DGGML_AVX512_BF16="$(sub512 avx512_bf16)"
        # AMX off: see the header (GCC 12 miscompiles ggml's AMX tile config -> SIGILL).
        -DGGML_AMX_TILE=OFF
        -DGGML_AMX_INT8=OFF
        -DGGML_AMX_BF16=OFF
    )
    has amx_tile && log "the CPU has AMX ($(grep -o 'amx[a-z0-9_]*' <<<"$cpu_flags" | sort -u | tr '\n' ' ')); building with explicit ISA flags, AMX off"
else
    ARCH_ARGS=(-DGGML_NATIVE=ON)
fi

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
if grep -rqs ARCH_REQ_XCOMP_PERM "$SRC/ggml/src/ggml-cpu/"; then
    log "note: this llama.cpp requests the AMX tile state itself (ARCH_REQ_XCOMP_PERM in ggml-cpu)"
fi

# --- 2. configure + build llama-server and llama-perplexity ---
BUILD="$DEST/build"
rm -f "$BUILD/CMakeCache.txt"                   # no stale GGML_* options from an earlier ARCH
CMAKE_ARGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_CURL=OFF
    -DLLAMA_OPENSSL=OFF
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_TOOLS=ON
    "${ARCH_ARGS[@]}"
)
log "configuring $SRC (Release, static, no curl/openssl/web UI, ARCH=$ARCH) in $BUILD"
log "  cmake flags: ${CMAKE_ARGS[*]}"
nice -n "$NICE" cmake -S "$SRC" -B "$BUILD" "${GENERATOR[@]}" "${CMAKE_ARGS[@]}" \
    || die "cmake configure failed (see above)"
log "building targets llama-server llama-perplexity with $JOBS jobs at nice $NICE (~9 min on 2 cores)"
nice -n "$NICE" cmake --build "$BUILD" --config Release --target llama-server llama-perplexity -j "$JOBS" \
    || die "cmake build failed (see above)"

for target in llama-server llama-perplexity; do
    built=$(find "$BUILD" -type f -name "$target" -perm -u+x | head -n1)
    [[ -n "$built" ]] || die "the build produced no $target binary under $BUILD"
    install -m 0755 "$built" "$DEST/bin/$target.tmp" && mv -f "$DEST/bin/$target.tmp" "$DEST/bin/$target"
done
"$BIN" --version >/dev/null 2>&1 || die "$BIN was built but '--version' fails"
echo "$name" > "$DEST/SOURCE"
echo "${CMAKE_ARGS[*]}" > "$DEST/BUILD_FLAGS"
log "built and installed $BIN and $PPL_BIN in $(( $(date +%s) - start )) s"

smoke_test
if [[ -z "${KEEP_BUILD:-}" ]]; then
    log "removing the build tree $BUILD (KEEP_BUILD=1 keeps it)"
    rm -rf "$BUILD"
fi
log "done in $(( $(date +%s) - start )) s"
"$BIN" --version 2>&1 | sed 's/^/[build_llama_server]   /'
