"""The systems `surge bench serve` can start: how to launch each, and whether it is installed here."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)

SYSTEMS = ("surge", "surge-quant", "naive", "vllm", "llamacpp")
HF_COPY_NAME = "SmolLM2-135M-Instruct-hf"


def peers_dir() -> Path:
    """Where the peers' virtual environments and builds live (`$SURGE_PEERS`)."""
    return Path(os.environ.get("SURGE_PEERS", "~/.cache/surge/peers")).expanduser()


@dataclass(frozen=True)
class LaunchSettings:
    """What every system of one run is started with, so they are compared on equal terms."""

    model: str | None = None  # surge's model argument: None = the bundled default
    max_num_seqs: int = 64
    ctx_per_seq: int = 2048  # context each sequence may use (llama.cpp splits -c over slots)
    dtype: str = "auto"
    prefix_caching: bool = True
    threads: int | None = None


@dataclass(frozen=True)
class Baseline:
    """One system, ready to launch: its command, env, readiness URL and request extras."""

    name: str
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/health"
    ready_timeout: float = 300.0
    extra_body: dict[str, object] = field(default_factory=dict)
    missing: str | None = None  # why it cannot run here; None = installed
    version: str = ""

    def with_port(self, port: int) -> list[str]:
        """The command with its `{port}` placeholder filled."""
        return [part.replace("{port}", str(port)) for part in self.command]


def _surge_version() -> str:
    from importlib.metadata import version

    return f"surge {version('surge')}"


def surge_baseline(s: LaunchSettings, quantization: str = "none") -> Baseline:
    """surge itself, `python -m surge.cli serve`: bf16 weights ("surge", the same weights as vLLM
    and the naive server) or a GGUF's quantized weights kept quantized ("surge-quant", the same
    weights as llama.cpp)."""
    cmd = [sys.executable, "-m", "surge.cli", "serve", *([s.model] if s.model else [])]
    cmd += ["--quantization", quantization]
    cmd += ["--host", "127.0.0.1", "--port", "{port}", "--max-num-seqs", str(s.max_num_seqs)]
    cmd += ["--dtype", s.dtype] + ([] if s.prefix_caching else ["--no-prefix-caching"])
    cmd += ["--threads", str(s.threads)] if s.threads else []
    return Baseline(
        "surge" if quantization == "none" else "surge-quant",
        tuple(cmd),
        ready_path="/ready",
        extra_body={"ignore_eos": True},
        version=_surge_version(),
    )


def naive_baseline(s: LaunchSettings) -> Baseline:
    """HF transformers `generate` behind FastAPI, one request at a time (naive_server.py)."""
    import transformers

    cmd = [sys.executable, "-m", "surge.bench.naive_server", *([s.model] if s.model else [])]
    cmd += ["--port", "{port}", "--dtype", s.dtype]
    cmd += ["--threads", str(s.threads)] if s.threads else []
    return Baseline(
        "naive",
        tuple(cmd),
        extra_body={"ignore_eos": True},
        version=f"transformers {transformers.__version__}",
    )


def _hf_model_dir(s: LaunchSettings) -> Path | None:
    if s.model is None:
        return peers_dir() / "models" / HF_COPY_NAME
    path = Path(s.model).expanduser()
    return path if (path / "config.json").is_file() else None


def _vllm_version(venv: Path) -> str:
    for info in sorted(venv.glob("lib/python*/site-packages/vllm*.dist-info")):
        match = re.match(r"(vllm[\w-]*)-([\w.+]+)\.dist-info", info.name)
        if match:
            return f"{match[1]} {match[2]}"
    return "vllm (version unknown)"


def vllm_baseline(s: LaunchSettings) -> Baseline:
    """vLLM's CPU build from its own venv (`$SURGE_PEERS/vllm`), on an HF copy of the model."""
    venv, model_dir = peers_dir() / "vllm", _hf_model_dir(s)
    python = venv / "bin" / "python"
    missing = None
    if not python.exists():
        missing = f"no vLLM venv at {venv} (see benchmarks/peers/)"
    elif model_dir is None or not (model_dir / "config.json").is_file():
        missing = f"vLLM needs an HF-format model dir ({model_dir or s.model} not found)"
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", "{port}", "--dtype", "bfloat16"]
    cmd += ["--max-num-seqs", str(s.max_num_seqs), "--max-model-len", str(s.ctx_per_seq)]
    cmd += ["--served-model-name", "model"]
    cmd += [] if s.prefix_caching else ["--no-enable-prefix-caching"]
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "4"}
    return Baseline(
        "vllm",
        tuple(cmd),
        env=env,
        ready_timeout=300.0,
        extra_body={"ignore_eos": True},
        missing=missing,
        version="" if missing else _vllm_version(venv),
    )


def _gguf_model(s: LaunchSettings) -> Path | None:
    if s.model is None:
        from surge.models.loader import resolve_model_path

        return resolve_model_path(None)
    path = Path(s.model).expanduser()
    return path if path.suffix == ".gguf" and path.is_file() else None


def _llama_version(binary: Path) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=20)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("version"):
                return f"llama-server {line.split(':', 1)[1].strip()}"
    return "llama-server (version unknown)"


def llamacpp_baseline(s: LaunchSettings) -> Baseline:
    """llama.cpp's `llama-server` (`$SURGE_PEERS/llama.cpp/bin`), slots = max concurrency."""
    binary, gguf = peers_dir() / "llama.cpp" / "bin" / "llama-server", _gguf_model(s)
    missing = None
    if not binary.exists():
        missing = f"no llama-server at {binary} (see benchmarks/peers/)"
    elif gguf is None:
        missing = f"llama-server needs a .gguf model ({s.model} is not one)"
    cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", "{port}"]
    cmd += ["--parallel", str(s.max_num_seqs), "-c", str(s.max_num_seqs * s.ctx_per_seq)]
    cmd += ["--cont-batching", "--alias", "model"]
    cmd += ["--threads", str(s.threads)] if s.threads else []
    # Prompt caching is per request (`cache_prompt`, on by default); off = recompute every prompt.
    extra: dict[str, object] = {"ignore_eos": True, "cache_prompt": s.prefix_caching}
    return Baseline(
        "llamacpp",
        tuple(cmd),
        extra_body=extra,
        missing=missing,
        version="" if missing else _llama_version(binary),
    )


_FACTORIES = {
    "surge": surge_baseline,
    "surge-quant": functools.partial(surge_baseline, quantization="gguf"),
    "naive": naive_baseline,
    "vllm": vllm_baseline,
    "llamacpp": llamacpp_baseline,
}


def get_baseline(name: str, settings: LaunchSettings) -> Baseline:
    """The launch spec of system `name` under `settings`."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown system {name!r}; choose from {', '.join(SYSTEMS)}")
    return _FACTORIES[name](settings)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children before grandchildren."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class ManagedServer:
    """A system started as a subprocess on a free port; `stop()` ends it and its children by PID."""

    def __init__(self, baseline: Baseline, port: int, log_dir: Path | None = None) -> None:
        self.baseline = baseline
        self.base_url = f"http://127.0.0.1:{port}"
        self.command = baseline.with_port(port)
        self.log_path = Path(
            tempfile.mkstemp(prefix=f"{baseline.name}-", suffix=".log", dir=log_dir)[1]
        )
        self._log = self.log_path.open("wb")
        logger.info("starting %s: %s", baseline.name, " ".join(self.command))
        self.proc = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **baseline.env},
        )

    def wait_ready(self) -> None:
        """Poll the readiness URL; raise with the log's tail if the server exits or is too slow."""
        deadline = time.monotonic() + self.baseline.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.baseline.name} exited: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (
                    httpx.get(self.base_url + self.baseline.ready_path, timeout=2).status_code
                    == 200
                ):
                    return
            time.sleep(0.5)
        raise TimeoutError(f"{self.baseline.name} not ready in {self.baseline.ready_timeout}s")

    def log_tail(self, num_chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the server and its descendants, SIGKILL what is left after `grace` seconds."""
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
            deadline = time.monotonic() + grace
            while any(_alive(p) for p in pids[1:]) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not any(_alive(p) for p in pids):
                break
        self._log.close()


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
