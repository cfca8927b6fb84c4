"""The model's HF tokenizer behind a small API, its chat template, and the incremental detokenizer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from surge.models.loader import ModelFiles, gguf_field, open_gguf

logger = logging.getLogger(__name__)

# Tokens of prompt context decoded before the output so the first output token gets its
# leading space right (sentencepiece drops it at the start of a decode); vLLM uses 5 too.
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """Encode, decode and chat-template for one model; built from local files only."""

    def __init__(
        self,
        hf_tokenizer: PreTrainedTokenizerBase,
        eos_token_ids: tuple[int, ...],
        name: str = "model",
    ) -> None:
        self.hf_tokenizer = hf_tokenizer
        self.eos_token_ids = eos_token_ids
        self.vocab_size: int = len(hf_tokenizer)
        self.name = name

    @classmethod
    def from_model_files(cls, files: ModelFiles) -> Tokenizer:
        """Load the tokenizer of an HF directory or a GGUF file (never from a hub)."""
        # The config's eos ids (GGUF: eos/eot/eom) and generation_config's also end generation.
        extra_eos = _as_id_list(getattr(files.hf_config, "eos_token_id", None))
        if files.is_gguf:
            path = files.path
            hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            if hf.chat_template is None:
                hf.chat_template = gguf_field(open_gguf(path), "tokenizer.chat_template")
            return cls(hf, _collect_eos_ids(hf, extra_eos), name=path.stem)
        hf = AutoTokenizer.from_pretrained(files.path, local_files_only=True)
        extra_eos += _generation_config_eos(files.path)
        return cls(hf, _collect_eos_ids(hf, extra_eos), name=files.path.name)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS etc. as the model's tokenizer does."""
        return self.hf_tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of `token_ids`; no space clean-up, so decoding in pieces concatenates exactly."""
        return self.hf_tokenizer.decode(
            token_ids,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    @property
    def has_chat_template(self) -> bool:
        """Whether the model ships a chat template."""
        return bool(self.hf_tokenizer.chat_template)

    def render_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The chat prompt as text; ValueError if the model has no chat template."""
        if not self.has_chat_template:
            raise ValueError(
                f"model {self.name!r} has no chat template; use the completions API with a raw prompt"
            )
        return self.hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """The chat prompt as token ids; ValueError if the model has no chat template."""
        text = self.render_chat_template(messages, add_generation_prompt)
        # The template writes BOS itself when the model wants one; adding it again would double it.
        return self.encode(text, add_special_tokens=False)


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(value)] if isinstance(value, int) else [int(v) for v in value]


def _generation_config_eos(directory: Path) -> list[int]:
    path = directory / "generation_config.json"
    if not path.is_file():
        return []
    return _as_id_list(json.loads(path.read_text()).get("eos_token_id"))


def _collect_eos_ids(hf: PreTrainedTokenizerBase, extra: list[int]) -> tuple[int, ...]:
    ids = [hf.eos_token_id] if hf.eos_token_id is not None else []
    ids += extra
    unique = tuple(dict.fromkeys(int(i) for i in ids))
    if not unique:
        logger.warning("tokenizer names no EOS token; generation stops only at max_tokens or stop")
    return unique


class IncrementalDetokenizer:
    """Turn a stream of output token ids into safe text deltas, applying stop strings.

    Decodes only a small window per step (vLLM's prefix/read offsets): the text of
    ids[prefix:read] is already emitted, ids[prefix:] is decoded, and the difference is new.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        stop: list[str],
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop = [s for s in stop if s]
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._include_stop = include_stop_str_in_output
        # Only the prompt's tail is kept: it is the decode context for the first output tokens.
        self._ids = list(prompt_token_ids[-(_PROMPT_CONTEXT_TOKENS + 1) :])
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - _PROMPT_CONTEXT_TOKENS, 0)
        self._num_emitted = 0  # chars of `text` already returned as deltas
        self.text = ""
        self.stop_matched: str | None = None

    def add_tokens(self, token_ids: list[int]) -> str:
        """Take newly sampled ids; return the text that is now safe to emit (may be "")."""
        if self.stop_matched is not None or not token_ids:
            return ""
        self._ids.extend(token_ids)
        new_text = self._decode_pending(final=False)
        if new_text:
            self._append(new_text)
        return self._take_delta(final=False)

    def flush(self) -> str:
        """At finish: decode what was held for incomplete characters and return all unsent text."""
        if self.stop_matched is None:
            new_text = self._decode_pending(final=True)
            if new_text:
                self._append(new_text)
        return self._take_delta(final=True)

    def _decode_pending(self, final: bool) -> str:
        """Text of the ids past the read offset, or "" while it ends inside a character."""
        window = self._ids[self._prefix_offset :]
        prefix_text = self._decode(window[: self._read_offset - self._prefix_offset])
        full_text = self._decode(window)
        if len(full_text) <= len(prefix_text):
            return ""  # e.g. only skipped special tokens so far
        if not final and full_text.endswith(_REPLACEMENT_CHAR):
            return ""  # a multi-byte character is not complete yet; wait for its next bytes
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]

    def _decode(self, token_ids: list[int]) -> str:
        if not token_ids:
            return ""
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)

    def _append(self, new_text: str) -> None:
        """Add decoded text, then cut it at the first stop string that ends in the new part."""
        old_len = len(self.text)
        self.text += new_text
        if not self._stop:
            return
        # A match must end in the new text, so it starts at most max_stop_len - 1 chars before it.
        start = max(old_len - self._max_stop_len + 1, 0)
        best: tuple[int, str] | None = None
        for stop in self._stop:
            pos = self.text.find(stop, start)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, stop)
        if best is not None:
            pos, stop = best
            self.stop_matched = stop
            self.text = self.text[: pos + len(stop)] if self._include_stop else self.text[:pos]

    def _holdback(self) -> int:
        """Chars at the end of `text` that could still begin a stop string."""
        longest = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _take_delta(self, final: bool) -> str:
        end = len(self.text)
        if not final and self.stop_matched is None:
            end -= self._holdback()
        if end <= self._num_emitted:
            return ""
        delta = self.text[self._num_emitted : end]
        self._num_emitted = end
        return delta
