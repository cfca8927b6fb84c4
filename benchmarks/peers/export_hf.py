#!/usr/bin/env python
"""Write an HF-format copy of surge's bundled default model, for the peers that need one (vLLM, naive HF).

    python benchmarks/peers/export_hf.py [OUT_DIR] [--dtype bfloat16|float32] [--force] [--no-check]

OUT_DIR defaults to `${SURGE_PEERS:-~/.cache/surge/peers}/models/SmolLM2-135M-Instruct-hf`.
The weights come from the bundled Q4_1 GGUF through surge's own loader (dequantized, Q/K rows
un-permuted), so every peer runs exactly the weights llama.cpp and surge run. Writes config.json,
generation_config.json, model.safetensors and the tokenizer files (tokenizer.json,
tokenizer_config.json, chat_template.jinja with the model's chat template). Embeddings are tied:
`tie_word_embeddings` stays true and no lm_head is written.

Idempotent: if OUT_DIR already holds a complete copy it only re-runs the check (skip with
--no-check); --force rewrites it. The check loads the dir with transformers (AutoModelForCausalLM +
AutoTokenizer) and greedy-generates an answer to "What is the capital of France?"; it must say Paris.
Takes ~10-20 s; ~270 MB on disk in bfloat16 (~540 MB in float32).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

MODEL_DIR_NAME = "SmolLM2-135M-Instruct-hf"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def peers_dir() -> Path:
    env = os.environ.get("SURGE_PEERS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "surge" / "peers"


def default_out_dir() -> Path:
    return peers_dir() / "models" / MODEL_DIR_NAME


def log(msg: str) -> None:
    print(f"[export_hf] {msg}", flush=True)


def is_complete(out: Path) -> bool:
    return all((out / name).is_file() for name in REQUIRED_FILES)


def _clean_float(x: float) -> float:
    """GGUF stores e.g. rms_norm_eps as float32 (9.99999974e-06); write the value it meant (1e-05)."""
    import numpy as np

    return float(str(np.float32(x)))


def export(out: Path, dtype_name: str) -> None:
    import torch
    from safetensors.torch import save_file

    from surge.models.loader import iter_weights, load_model_files
    from surge.tokenizer import Tokenizer

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype_name]
    t0 = time.time()
    files = load_model_files(
        None
    )  # the bundled default model (pulled into surge's cache if needed)
    log(f"source: {files.path} ({'GGUF' if files.is_gguf else 'HF dir'})")
    config = files.hf_config
    tokenizer = Tokenizer.from_model_files(files)
    hf_tok = tokenizer.hf_tokenizer
    if not hf_tok.chat_template:
        raise SystemExit(
            "export_hf: the default model's tokenizer has no chat template; refusing to export"
        )

    # Write into a temp dir beside OUT_DIR, then rename: a crash never leaves a half-written copy.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part"))
    try:
        # --- weights ---
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor in iter_weights(files, dtype):
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # tied to model.embed_tokens.weight
            tensors[name] = tensor.contiguous()
        n_params = sum(t.numel() for t in tensors.values())
        log(f"weights: {len(tensors)} tensors, {n_params / 1e6:.1f} M parameters, {dtype_name}")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})

        # --- config.json ---
        config.rms_norm_eps = _clean_float(config.rms_norm_eps)
        config.tie_word_embeddings = bool(config.tie_word_embeddings)
        config.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        # transformers 5 writes rope_parameters; older readers (vLLM's own transformers) want rope_theta.
        rope = cfg.get("rope_parameters") or {}
        if "rope_theta" not in cfg and "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]
        cfg["torch_dtype"] = dtype_name  # older transformers / vLLM read this key
        cfg["dtype"] = dtype_name
        cfg["tie_word_embeddings"] = True if config.tie_word_embeddings else False
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

        # --- generation_config.json: greedy-neutral defaults, the model's eos ids ---
        eos = list(tokenizer.eos_token_ids)
        gen = {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": hf_tok.pad_token_id if hf_tok.pad_token_id is not None else eos[0],
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

        # --- tokenizer (+ chat template) ---
        hf_tok.save_pretrained(str(tmp))
        # Make the template visible to every reader: chat_template.jinja (transformers >= 4.43 style)
        # and the "chat_template" key of tokenizer_config.json (what older readers look at).
        template = hf_tok.chat_template
        (tmp / "chat_template.jinja").write_text(template)
        tc_path = tmp / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {}
        tc["chat_template"] = template
        # transformers 5 writes its own class name (TokenizersBackend), unknown to transformers 4.x
        # that a peer's venv may hold; the upstream SmolLM2 repo names GPT2Tokenizer, which both
        # versions load from tokenizer.json. Drop the load-time keys save_pretrained leaks.
        if tc.get("tokenizer_class") in (None, "TokenizersBackend", "PreTrainedTokenizerFast"):
            tc["tokenizer_class"] = "GPT2Tokenizer"
        tc["model_max_length"] = files.max_model_len
        for key in ("is_local", "local_files_only"):
            tc.pop(key, None)
        tc.setdefault("eos_token", hf_tok.eos_token)
        tc.setdefault("bos_token", hf_tok.bos_token)
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")

        missing = [name for name in REQUIRED_FILES if not (tmp / name).is_file()]
        if missing:
            raise SystemExit(f"export_hf: tokenizer/config export did not write {missing}")
        # mkdtemp/safetensors make owner-only files; a shared cache should be readable.
        os.chmod(tmp, 0o755)
        for p in tmp.iterdir():
            os.chmod(p, 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out.iterdir()) / 1e6
    log(
        f"wrote {out} ({size:.0f} MB) in {time.time() - t0:.1f} s: {sorted(p.name for p in out.iterdir())}"
    )


def check(out: Path) -> None:
    """transformers must load the dir and answer the capital-of-France question with Paris."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    if not tok.chat_template:
        raise SystemExit(f"export_hf: CHECK FAILED: {out} has no chat template for AutoTokenizer")
    model = AutoModelForCausalLM.from_pretrained(
        str(out), local_files_only=True, dtype=torch.float32
    )
    model.eval()
    if (
        model.get_output_embeddings().weight.data_ptr()
        != model.get_input_embeddings().weight.data_ptr()
    ):
        raise SystemExit("export_hf: CHECK FAILED: lm_head is not tied to embed_tokens")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        gen = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    log(f"check: greedy answer {answer!r} ({time.time() - t0:.1f} s)")
    if "Paris" not in answer:
        raise SystemExit(f"export_hf: CHECK FAILED: expected 'Paris' in the answer, got {answer!r}")
    log("check: OK (transformers loads it; answer mentions Paris)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "out_dir", nargs="?", type=Path, default=None, help=f"default: {default_out_dir()}"
    )
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--force", action="store_true", help="rewrite even if OUT_DIR is complete")
    parser.add_argument(
        "--no-check", action="store_true", help="skip the transformers generate check"
    )
    args = parser.parse_args()
    out = (args.out_dir or default_out_dir()).expanduser().resolve()

    if is_complete(out) and not args.force:
        log(f"{out} already holds a complete HF copy; skipping the export (--force rewrites it)")
    else:
        log(f"exporting the default model to {out}")
        export(out, args.dtype)
    if not args.no_check:
        check(out)
    print(out)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
