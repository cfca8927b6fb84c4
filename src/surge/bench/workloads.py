"""Seeded, locally generated chat workloads for `surge bench serve` (no dataset download)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

WORKLOADS = ("short", "sharegpt", "shared-prefix")

_TOPICS = (
    "the French Revolution",
    "photosynthesis",
    "black holes",
    "the Roman Empire",
    "volcanoes",
    "machine learning",
    "the water cycle",
    "jazz music",
    "the printing press",
    "coral reefs",
    "the Silk Road",
    "quantum computing",
    "honey bees",
    "the Moon landing",
    "rainforests",
    "the stock market",
    "ancient Egypt",
    "electric cars",
    "the human heart",
    "chess openings",
    "climate change",
    "the Renaissance",
    "sourdough bread",
    "plate tectonics",
    "the Internet",
    "vaccines",
    "the Great Wall of China",
    "solar panels",
    "octopuses",
    "the Olympic Games",
)
_TEMPLATES = (
    "Explain {t} to a ten-year-old.",
    "What are three interesting facts about {t}?",
    "Write a short poem about {t}.",
    "Summarize the history of {t} in a few sentences.",
    "Why is {t} important?",
    "Give me a quick quiz question about {t} and its answer.",
    "What is a common misconception about {t}?",
    "Describe {t} in one paragraph.",
)
# Plain English prose written for this file: prompts of any length are windows over it.
_TEXT = """
The river town woke slowly in the grey light of early spring. Fishermen pulled their boats up
the muddy bank and spread their nets to dry, while children ran between the wooden houses with
bread still warm from the ovens. An old clockmaker opened his shutters and set the brass hands of
his largest clock to the hour he had heard from the church bell, which was always a little late.
Farther up the valley, the first trains of the season carried timber and wool toward the coast,
and the station master counted the wagons twice because he trusted neither his eyes nor the
papers the drivers handed him. Merchants argued about the price of salt, the weather, and the
new bridge that the council had promised for a decade and never built. In the library a young
woman copied maps by candlelight, tracing coastlines that sailors had described a century before,
and she wondered how many of those bays and islands still looked the way the old ink said they
did. Scientists teach that every careful measurement begins with a question and ends with a
number and its uncertainty. A good experiment changes one thing at a time, records everything,
and is repeated until the noise is understood. Engineers who build bridges learn the same lesson
from steel and wind: the load a structure carries on a calm afternoon says little about the storm
it must survive. Cooks know it too, since bread that rises beautifully in a warm kitchen may sink
in a cold one, and the recipe alone never tells the whole story. When the evening came, the
lamps were lit along the harbour wall, and the smell of smoke and salt drifted over the water.
Travellers who arrived on the last coach asked for rooms, for soup, and for news of the roads
to the north, which had been closed by snow for most of the winter. The innkeeper told them what
he knew and a good deal that he did not, and they listened politely because the soup was good.
"""
_WORDS = _TEXT.split()
_QUESTIONS = (
    "What is the main idea of the text above?",
    "Who are the people mentioned above?",
    "What season is described?",
    "List three objects that appear in the text.",
    "What lesson do the engineers learn?",
    "Rewrite the first sentence more simply.",
    "What does the innkeeper do?",
    "Give the text a title.",
    "What do the merchants argue about?",
    "Which professions are mentioned?",
    "Is the tone of the text happy or sad? Why?",
    "What is the station master worried about?",
    "Translate the last sentence into French.",
    "Summarize the text in one sentence.",
    "What does a good experiment do?",
)


@dataclass(frozen=True)
class Prompt:
    """One request of a workload: chat messages and the output budget."""

    messages: tuple[tuple[str, str], ...]  # (role, content) pairs
    max_tokens: int

    def to_messages(self) -> list[dict[str, str]]:
        """OpenAI's `messages` list."""
        return [{"role": role, "content": content} for role, content in self.messages]


def english_text(rng: random.Random, num_words: int) -> str:
    """`num_words` consecutive words of the built-in prose, from a random start (wrapping)."""
    start = rng.randrange(len(_WORDS))
    return " ".join(_WORDS[(start + i) % len(_WORDS)] for i in range(max(1, num_words)))


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma)))))


def short_workload(rng: random.Random, num_prompts: int, max_tokens: int) -> list[Prompt]:
    """Short chat questions: a template filled with a topic."""
    return [
        Prompt(
            messages=(("user", rng.choice(_TEMPLATES).format(t=rng.choice(_TOPICS))),),
            max_tokens=max_tokens,
        )
        for _ in range(num_prompts)
    ]


def sharegpt_workload(rng: random.Random, num_prompts: int, max_tokens: int) -> list[Prompt]:
    """A ShareGPT-like mix: lognormal prompt lengths (words) and output budgets."""
    prompts = []
    for _ in range(num_prompts):
        # Medians and spreads shaped like ShareGPT's (long-tailed both ways), capped so a prompt
        # plus its output fits a 2048-token context.
        num_words = _lognormal_int(rng, median=120, sigma=0.9, lo=4, hi=700)
        out = _lognormal_int(rng, median=max_tokens, sigma=0.6, lo=4, hi=2 * max_tokens)
        task = rng.choice(("Summarize this:", "Continue this story:", "Answer briefly:"))
        prompts.append(Prompt((("user", f"{task} {english_text(rng, num_words)}"),), out))
    return prompts


def shared_prefix_workload(
    rng: random.Random, num_prompts: int, max_tokens: int, prefix_words: int = 400
) -> list[Prompt]:
    """One long system prompt shared by every request, then a short distinct question each."""
    system = "You are a helpful reading assistant. Answer questions about this text.\n\n"
    system += english_text(random.Random(rng.random()), prefix_words)
    return [
        Prompt(
            (("system", system), ("user", f"{rng.choice(_QUESTIONS)} (question {i})")),
            max_tokens,
        )
        for i in range(num_prompts)
    ]


def make_workload(name: str, num_prompts: int, max_tokens: int, seed: int = 0) -> list[Prompt]:
    """The prompts of workload `name`; the same arguments give the same prompts."""
    rng = random.Random(f"{name}:{seed}")
    if name == "short":
        return short_workload(rng, num_prompts, max_tokens)
    if name == "sharegpt":
        return sharegpt_workload(rng, num_prompts, max_tokens)
    if name == "shared-prefix":
        return shared_prefix_workload(rng, num_prompts, max_tokens)
    raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
