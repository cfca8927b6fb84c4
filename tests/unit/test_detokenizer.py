"""IncrementalDetokenizer: safe UTF-8 deltas, prompt context, stop strings and their holdback."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from surge.models.loader import load_model_files
from surge.tokenizer import IncrementalDetokenizer, Tokenizer
from tests.tiny_models import make_tokenizer

CHINESE = "你好，世界！这是一个测试。"
EMOJI = "Emoji 😀👍🏽 and a family 👨‍👩‍👧 ok"


@pytest.fixture(scope="module", params=["smollm2", "tiny"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    if request.param == "tiny":
        hf = make_tokenizer()
        return Tokenizer(hf, (hf.eos_token_id,), name="tiny")
    path: Path = request.getfixturevalue("default_model_path")
    return Tokenizer.from_model_files(load_model_files(str(path)))


def _stream(
    tok: Tokenizer, ids: list[int], chunk: int = 1, prompt: str = "Say:", **kwargs: object
) -> tuple[IncrementalDetokenizer, list[str]]:
    detok = IncrementalDetokenizer(tok, tok.encode(prompt), **{"stop": [], **kwargs})
    deltas = [detok.add_tokens(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.flush())
    return detok, deltas


@pytest.mark.parametrize("text", [CHINESE, EMOJI, f"Mixed: {CHINESE} {EMOJI}!"])
@pytest.mark.parametrize("chunk", [1, 3])
def test_multibyte_text_streams_without_broken_characters(
    tok: Tokenizer, text: str, chunk: int
) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    detok, deltas = _stream(tok, ids, chunk=chunk)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == detok.text == tok.decode(ids) == text
    assert detok.stop_matched is None


def test_a_character_split_over_tokens_is_held_back(tok: Tokenizer) -> None:
    ids = tok.encode("😀", add_special_tokens=False)
    assert len(ids) > 1  # both vocabularies split this emoji into byte tokens
    detok, deltas = _stream(tok, ids)
    assert deltas[:-2] == [""] * (len(ids) - 1) and deltas[-2] == "😀" and deltas[-1] == ""


def test_flush_emits_an_unfinished_character_like_a_full_decode(tok: Tokenizer) -> None:
    ids = tok.encode("a😀", add_special_tokens=False)[:-1]
    detok, deltas = _stream(tok, ids)
    assert "".join(deltas) == detok.text == tok.decode(ids)
    assert deltas[-1].endswith("\ufffd")


def test_leading_space_comes_from_prompt_context(tok: Tokenizer) -> None:
    ids = tok.encode(" world", add_special_tokens=False)
    detok, deltas = _stream(tok, ids, prompt="Hello")
    assert "".join(deltas) == " world"


def test_special_tokens_follow_skip_special_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("Done.", add_special_tokens=False) + [tok.eos_token_ids[0]]
    eos_text = tok.decode([tok.eos_token_ids[0]], skip_special_tokens=False)
    detok, deltas = _stream(tok, ids)
    assert "".join(deltas) == detok.text == "Done."
    detok, deltas = _stream(tok, ids, skip_special_tokens=False)
    assert "".join(deltas) == detok.text == "Done." + eos_text


def _spans_tokens(tok: Tokenizer, ids: list[int], stop: str) -> bool:
    return stop in tok.decode(ids) and not any(stop in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens_truncates(tok: Tokenizer, include: bool) -> None:
    text = "The capital of France is Paris. It is lovely."
    stop = "s Par"
    ids = tok.encode(text, add_special_tokens=False)
    assert _spans_tokens(tok, ids, stop)
    detok, deltas = _stream(tok, ids, stop=[stop], include_stop_str_in_output=include)
    expected = "The capital of France is Par" if include else "The capital of France i"
    assert detok.text == "".join(deltas) == expected
    assert detok.stop_matched == stop
    assert detok.add_tokens(ids[:2]) == "" and detok.flush() == ""


def test_the_first_stop_to_appear_wins(tok: Tokenizer) -> None:
    ids = tok.encode("The capital of France is Paris.", add_special_tokens=False)
    detok, deltas = _stream(tok, ids, stop=["Paris", "France", "capital"])
    assert detok.stop_matched == "capital" and "".join(deltas) == "The "


def test_stop_text_in_the_prompt_does_not_stop(tok: Tokenizer) -> None:
    ids = tok.encode(" and more", add_special_tokens=False)
    detok, deltas = _stream(tok, ids, prompt="Paris.", stop=["Paris."])
    assert detok.stop_matched is None and "".join(deltas) == " and more"


def test_possible_stop_prefix_is_held_back_until_it_cannot_match(tok: Tokenizer) -> None:
    text = "I love Paris and Rome."
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode("Say:"), stop=["Paris!"])
    emitted = ""
    saw_holdback = False
    for token_id in ids:
        emitted += detok.add_tokens([token_id])
        assert detok.text.startswith(emitted)
        held = detok.text[len(emitted) :]
        assert "Paris!".startswith(held)  # only a possible stop beginning is ever held
        if detok.text == "I love Paris":
            assert emitted == "I love " and held == "Paris"
            saw_holdback = True
    assert saw_holdback or not any(tok.decode(ids[:n]) == "I love Paris" for n in range(len(ids)))
    emitted += detok.flush()
    assert emitted == detok.text == text and detok.stop_matched is None


def test_holdback_is_released_at_finish(tok: Tokenizer) -> None:
    ids = tok.encode("We went to Par", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["Paris"])
    streamed = "".join(detok.add_tokens([i]) for i in ids)
    assert not streamed.endswith("Par")
    assert streamed + detok.flush() == "We went to Par" == detok.text


def test_each_step_decodes_a_short_window(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 40, add_special_tokens=False)
    lengths: list[int] = []
    original = tok.decode

    def spy(token_ids: list[int], skip_special_tokens: bool = True) -> str:
        lengths.append(len(token_ids))
        return original(token_ids, skip_special_tokens)

    monkeypatch.setattr(tok, "decode", spy)
    detok = IncrementalDetokenizer(tok, tok.encode("Say:"), stop=["never appears"])
    streamed = "".join(detok.add_tokens([i]) for i in ids) + detok.flush()
    monkeypatch.undo()
    assert len(ids) > 200 and max(lengths) <= 8
    assert streamed == tok.decode(ids)


_PIECES = ["the", " cat", " 猫", "你好", "！", "😀", "👍🏽", " Paris", ".", "\n", " is", "a", "é"]


@pytest.mark.parametrize("seed", range(12))
def test_random_streams_match_full_decode_cut_at_stop(tok: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.choice(_PIECES) for _ in range(rng.randint(5, 40)))
    ids = tok.encode(text, add_special_tokens=False)
    full = tok.decode(ids)
    start = rng.randrange(len(full))
    stop = full[start : start + rng.randint(1, 4)] if seed % 3 else "never"
    include = bool(seed % 2)
    detok, deltas = _stream(
        tok, ids, chunk=rng.randint(1, 3), stop=[stop], include_stop_str_in_output=include
    )
    pos = full.find(stop)
    expected = full if pos == -1 else full[: pos + len(stop) * include]
    assert "".join(deltas) == detok.text == expected
    assert detok.stop_matched == (None if pos == -1 else stop)
    assert not any("\ufffd" in d for d in deltas)
