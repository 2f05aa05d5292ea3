"""Generation speed: KV-cache decoding against the book's cache-less loop, gpt2-small shapes (random
init, float32), on the book's test prompts (instruction-data.json [935:1045], the alpaca prompt ending
with the response header, GPT-2 tokens).

Run: python -m pytest benchmarks/test_generate_speed.py --benchmark-columns=mean,rounds
Every variant generates exactly NEW_TOKENS tokens per prompt (no end-of-text stop: a random model
rarely emits it, and equal work keeps the comparison fair). The cache-less loops cost minutes per
handful of prompts on two CPU cores, so every variant runs the same SUBSET of the 110 prompts; the
cached batched run over all 110 is reported on its own, without a baseline. Results: BENCHMARKS.md.
"""
import json

import numpy as np
import pytest

from minisft import GPT, GPTConfig, tokenizer
from minisft.generate import generate, generate_uncached
from minisft.judge import format_input
from tests.conftest import BOOK_DATA
from tests.helpers import backend_or_skip

NEW_TOKENS = 32
SUBSET = slice(None, None, 11)  # 10 of the 110 test prompts, spread over the set


@pytest.fixture(scope="module")
def prompts():
    entries = json.loads(BOOK_DATA.read_text())[935:1045]
    return [tokenizer.encode(format_input(e) + "\n\n### Response:\n") for e in entries]


@pytest.fixture(scope="module", params=["numpy", "numba"])
def model(request):
    B = backend_or_skip(request.param, "float32")
    if not hasattr(B, "attention_decode"):
        pytest.skip(f"the {request.param} backend has no KV-cache kernels yet")
    return GPT(GPTConfig.preset("gpt2-small"), backend=B, dtype="float32", seed=0)


def book_loop(model, prompts):
    """The book's generate, one prompt at a time: the whole window (cropped to the context) through
    the model every step, logits for every position, the last one taken, argmax."""
    C, out = model.cfg.context_length, []
    for p in prompts:
        seq = list(p)
        for _ in range(NEW_TOKENS):
            logits = model.logits(np.array([seq[-C:]]))[0, -1]      # (V,) of the (T, V) computed
            seq.append(int(logits.argmax()))
        out.append(seq[len(p):])
    return out


VARIANTS = {
    "book loop, one prompt at a time": book_loop,
    "uncached, one prompt at a time": lambda m, ps: [generate_uncached(m, [p], NEW_TOKENS, eos_id=None)[0] for p in ps],
    "uncached, batched": lambda m, ps: generate_uncached(m, ps, NEW_TOKENS, eos_id=None),
    "cached, one prompt at a time": lambda m, ps: [generate(m, [p], NEW_TOKENS, eos_id=None)[0] for p in ps],
    "cached, batched": lambda m, ps: generate(m, ps, NEW_TOKENS, eos_id=None),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_generate_subset(benchmark, model, prompts, variant):
    ps = prompts[SUBSET]
    benchmark.group = f"generate {len(ps)} prompts x {NEW_TOKENS} tokens, {model.B.name}"
    out = benchmark.pedantic(VARIANTS[variant], args=(model, ps), rounds=1, iterations=1)
    assert [len(o) for o in out] == [NEW_TOKENS] * len(ps)
    reference = generate(model, ps, NEW_TOKENS, eos_id=None)
    benchmark.extra_info["tokens_equal_to_cached"] = sum(a == b for a, b in zip(out, reference)) / len(ps)
    benchmark.extra_info["new_tokens_per_s"] = len(ps) * NEW_TOKENS / benchmark.stats.stats.mean


def test_generate_all_110_cached_batched(benchmark, model, prompts):
    benchmark.group = f"generate all 110 prompts x {NEW_TOKENS} tokens, {model.B.name}"
    out = benchmark.pedantic(generate, args=(model, prompts, NEW_TOKENS), kwargs=dict(eos_id=None),
                             rounds=1, iterations=1)
    assert len(out) == 110
    benchmark.extra_info["new_tokens_per_s"] = 110 * NEW_TOKENS / benchmark.stats.stats.mean
