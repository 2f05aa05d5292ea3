"""A planted bug of each class (a missing term, a wrong scale, a scatter in place of a scatter-add, a
transposed gradient, a mask leak) is caught by `minisft study` on every seed of 0-49, and reported
where it sits: the op study's kernel and the part of its gradient, a block's stage that runs it. The
studies run in-process on the numpy kernels, one backend method replaced at a time."""
import math

import numpy as np
import pytest

from minisft import study as S
from minisft.backends import numpy_backend as nb

SEEDS = range(50)
GOOD = {n: getattr(nb.NumpyBackend, n) for n in S.BACKWARDS}


def layernorm_without_the_mean_term(self, dout, x, w, mean, rstd, dskip=None):
    dx, dw, db = GOOD["layernorm_backward"](self, dout, x, w, mean, rstd, dskip)
    return dx + rstd[:, None] * (dout * w).mean(axis=-1, keepdims=True), dw, db


def head_loss_summed_not_averaged(self, h, w, targets, dw=None, grad_scale=1.0, need_dh=False, lora=None,
                                  dw_fresh=False):
    return GOOD["head_loss"](self, h, w, targets, dw, 1.0, need_dh, lora, dw_fresh)  # grad_scale = 1/M dropped


def embedding_scattered(self, dwte, dwpe, dx, tokens, positions):
    dwte[tokens] += dx  # a repeated index keeps one row's gradient: the last
    dwpe[positions] += dx


def attention_with(bug):
    """attention_backward (GPT-2's, H = Hkv) with one classic mistake."""
    def backward(self, dout, qkv, out, ctx, cu_seqlens, n_heads, max_seqlen, n_kv_heads=None):
        H, W = n_heads, qkv.shape[1]
        hd = W // (3 * H)
        scale = 1.0 / math.sqrt(hd)
        dqkv = np.empty_like(qkv)
        for s, p in enumerate(ctx):
            a, e = cu_seqlens[s], cu_seqlens[s + 1]
            q, k, v = self._split_heads(qkv[a:e], H, H)                                # (H, L, hd) each
            if bug == "mask leak":  # p recomputed in the backward, without the causal mask
                p = nb.softmax_forward((q @ k.transpose(0, 2, 1)) * scale)
            dy = dout[a:e].reshape(e - a, H, hd).transpose(1, 0, 2)                    # (H, L, hd)
            dqk = nb.softmax_backward(dy @ v.transpose(0, 2, 1), p) * scale           # (H, L, L)
            dk = dqk @ q if bug == "transposed" else dqk.transpose(0, 2, 1) @ q       # (H, L, hd)
            dv = p.transpose(0, 2, 1) @ dy
            dqkv[a:e] = np.concatenate([dqk @ k, dk, dv]).transpose(1, 0, 2).reshape(e - a, W)
        return dqkv
    return backward


# (the bug's class, the kernel, the planted kernel, the op study, the failing parts of its gradient,
#  the block study's first failing stage in backward order, or None where no block runs the kernel)
PLANTED = [
    ("missing term", "layernorm_backward", layernorm_without_the_mean_term, "layernorm", ["dx"], "h.0.ln2: dh.0.x2"),
    ("wrong scale", "head_loss", head_loss_summed_not_averaged, "cross-entropy", ["dh", "dw"], None),
    ("scatter", "embedding_backward", embedding_scattered, "embedding", ["dwte", "dwpe"], None),
    ("transposed", "attention_backward", attention_with("transposed"), "attention",
     ["dk head 0", "dk head 1"], "h.0.atty: dh.0.qkv"),
    ("mask leak", "attention_backward", attention_with("mask leak"), "attention",
     ["dq head 0", "dq head 1", "dk head 0", "dk head 1", "dv head 0", "dv head 1"], "h.0.atty: dh.0.qkv"),
]


def failing_parts(s) -> list:
    return [line.split(" kernel vs stages")[0].strip() for line in S.localise(s) if "FAILED" in line]


@pytest.mark.parametrize("bug, kernel, plant, op, parts, block_stage", PLANTED, ids=[p[0] for p in PLANTED])
def test_a_planted_bug_is_caught_on_every_seed_at_its_place(monkeypatch, bug, kernel, plant, op, parts,
                                                            block_stage):
    monkeypatch.setattr(nb.NumpyBackend, kernel, plant)
    for seed in SEEDS:
        s = S.study(op, seed=seed)
        first = S.first_failure(s)
        # the op's own stages are the reference: they pass, and the kernel fails against them
        assert first is not None and first.what.startswith(f"{s.kernel.name} backward = stages"), (seed, first)
        assert failing_parts(s) == parts, seed
    for seed in SEEDS[:3] if block_stage else ():  # the block's stages run the kernel: the first to fail is its
        assert S.first_failure(S.study("block", seed=seed)).what == block_stage, seed


def test_the_planted_bugs_report_what_is_wrong(monkeypatch):
    monkeypatch.setattr(nb.NumpyBackend, "layernorm_backward", layernorm_without_the_mean_term)
    assert any("without stage xc's term into dmean" in line for line in S.localise(S.study("layernorm")))
    monkeypatch.setattr(nb.NumpyBackend, "head_loss", head_loss_summed_not_averaged)
    s = S.study("cross-entropy")  # M = 5 targets: the sum is 5 times the mean
    assert all("(5 times the right one: a wrong scale)" in line for line in S.localise(s))


@pytest.mark.parametrize("seed", range(2))
def test_a_scattered_embedding_fails_the_model_study_at_its_first_stage(monkeypatch, seed):
    monkeypatch.setattr(nb.NumpyBackend, "embedding_backward", embedding_scattered)
    s = S.study("model", seed=seed)
    assert S.first_failure(s).what == "x: dwte.weight"  # every stage above it passes: the embedding is the bug
