"""Dynamic batching as pure functions: which queued rows form a window, and how it splits.

As in text-embeddings-inference, a batch closes on a token budget, not a row count: a few long
inputs cost what many short ones do. We run padded batches (no varlen attention on CPU), so the
budget counts padded tokens, rows x the longest row, and sorting a window by length keeps that
close to the real token count.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# A row joins a batch only if padding it to the batch's longest row wastes at most this
# fraction of that width: on CPU a padded token costs what a real one does, and batching gains
# less than padding a wide spread of lengths loses (measured: BENCHMARKS.md, embeddings).
MAX_PAD_FRACTION = 0.25
# A window holds up to this many batches' worth of tokens: enough rows to sort by length, few
# enough that requests arriving meanwhile wait a bounded time (windows are taken FIFO).
WINDOW_BATCHES = 4


def window_size(lengths: Iterable[int], max_batch_tokens: int, max_batch_size: int) -> int:
    """How many rows, from the front of the FIFO queue, form the next window (at least one).

    Reads `lengths` only as far as the window reaches, so a long queue costs nothing extra."""
    max_tokens = WINDOW_BATCHES * max_batch_tokens
    max_rows = WINDOW_BATCHES * max_batch_size
    total = 0
    count = 0
    for length in lengths:
        total += length
        if count and (total > max_tokens or count >= max_rows):
            return count
        count += 1
    return count


def plan_batches(
    lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int
) -> list[list[int]]:
    """Split a window into batches: indices sorted by length, longest first, each batch's padded
    size (rows x its longest row) within max_batch_tokens, its rows within max_batch_size and
    each row within MAX_PAD_FRACTION of the longest; a row longer than the budget runs alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Longest first, so the batch's first row sets its padded width.
        width = lengths[current[0]] if current else lengths[i]
        if current and (
            (len(current) + 1) * width > max_batch_tokens
            or len(current) >= max_batch_size
            or lengths[i] < (1 - MAX_PAD_FRACTION) * width
        ):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
