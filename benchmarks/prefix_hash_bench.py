"""Time the prefix-cache block keys of one 2048-token prompt (128 blocks); run before/after a change."""

import random
import sys
import timeit

from surge.engine.block_pool import hash_block

random.seed(0)
toks = [random.randrange(50000) for _ in range(2048)]


def run():
    parent = None
    for i in range(0, 2048, 16):
        parent = hash_block(parent, toks[i : i + 16])


n = 200
t = min(timeit.repeat(run, number=n, repeat=5)) / n
print(
    f"{sys.argv[1]}: {t * 1e6:.1f} us per 2048-token prompt (128 blocks), {t * 1e6 / 128:.2f} us/block"
)
