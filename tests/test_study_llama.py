"""`minisft study` of the Llama family's ops (rmsnorm, rope, swiglu, gqa, qk_norm, llama-block): every
stage checked against float64 finite differences on several seeds, PyTorch autograd beside ours, and a
planted bug of each kernel's classic kind caught, with exit 1, at the stage that runs it."""
import importlib.util
import re

import numpy as np
import pytest

from minisft import study as S
from minisft.backends import numpy_backend as nb
from minisft.cli import main

SEEDS = range(5)
STAGE = re.compile(r"^  \[\d+\] +(\S+) +backward ")
GRAD = re.compile(r"^ +(d\S+) +.*finite differences: error \S+ (ok|FAILED)")


def run_study(capsys, *args):
    rc = main(["study", *args])
    return rc, capsys.readouterr().out


def stage_results(out) -> dict:
    """The printed backward: stage -> {gradient: 'ok' | 'FAILED'}."""
    results, stage = {}, None
    for line in out.split("\nbackward")[1].split("\nkernel:")[0].splitlines():
        if m := STAGE.match(line):
            stage = m.group(1)
            results[stage] = {}
        elif (m := GRAD.match(line)) and stage is not None:
            results[stage][m.group(1)] = m.group(2)
    return results


def failed_stages(out) -> list:
    return [st for st, grads in stage_results(out).items() if "FAILED" in grads.values()]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("op", S.LLAMA_OPS)
def test_every_llama_op_passes_every_check_on_several_seeds(capsys, op, seed):
    rc, out = run_study(capsys, op, "--seed", str(seed))
    assert rc == 0, out
    s = S.study(op, seed=seed)
    assert len(stage_results(out)) == len(s.stages)
    assert f"{len(s.checks)} of {len(s.checks)} checks passed" in out and "FAILED" not in out
    assert max(c.err for c in s.checks) <= 1e-9  # correct kernels pass the 1e-7 bound by a wide margin


def test_the_llama_block_walks_minisft_llama_stages():
    s = S.study("llama-block")
    assert [st.out for st in s.stages] == ["layers.0." + st.out for st in S.llama.stages(s.meta["cfg"])]
    assert "layers.0.self_attn.qkv_proj.bias" not in s.leaves  # Llama's q/k/v have no bias: none is made up


def test_gqa_shows_each_key_value_heads_gradient_as_the_sum_over_its_group(capsys):
    rc, out = run_study(capsys, "gqa", "--heads", "4", "--kv-heads", "2", "--head-dim", "2")
    assert rc == 0
    per_kv, per_q = r"\(2, 4, 2\) \| \(2, 3, 2\)", r"\(4, 4, 2\) \| \(4, 3, 2\)"
    for name, shape in [("k", per_kv), ("v", per_kv), ("kr", per_q), ("vr", per_q)]:
        assert re.search(rf"\] +{name} +{shape} +{name} = ", out), name
    assert "dk[j] = sum_g dkr[j G + g], g < G: the sum over head j's group of 2 query heads" in out
    s = S.study("gqa", heads=4, kv_heads=2, head_dim=2)
    for dk, dkr in zip(s.grads["k"], s.grads["kr"]):  # the printed arrays: dk is dkr summed in pairs
        np.testing.assert_array_equal(dk, dkr[0::2] + dkr[1::2])


def test_rope_positions_restart_at_each_packed_sequence(capsys, monkeypatch):
    rc, out = run_study(capsys, "rope", "--lengths", "4,3")
    assert rc == 0 and "positions [0, 1, 2, 3, 0, 1, 2] (restarting at each sequence)" in out
    good = nb.NumpyBackend.rope_forward

    def row_numbers(self, qkv, cos, sin, positions, n_rot):  # forgets that positions restart
        return good(self, qkv, cos, sin, np.arange(len(positions)), n_rot)
    monkeypatch.setattr(nb.NumpyBackend, "rope_forward", row_numbers)
    rc, out = run_study(capsys, "rope", "--lengths", "4,3")
    assert rc == 1
    assert re.search(r"  forward = stages +error \S+ \(<= 1e-12\) FAILED", out)


# ---- planted bugs: each kernel's classic mistake, caught at the stage that runs the kernel ----------------
def rmsnorm_with_layernorms_mean_term(good):
    def bug(self, dout, x, w, rstd, dskip=None):
        dx, dw = good(self, dout, x, w, rstd, dskip)
        return dx - rstd[:, None] * (dout * w).mean(axis=-1, keepdims=True), dw
    return bug


def rope_backward_by_plus_theta(good):
    def bug(self, dout, cos, sin, positions, n_rot):
        return self.rope_forward(dout, cos, sin, positions, n_rot)
    return bug


def swiglu_without_the_g_sigma_prime_term(good):
    def bug(self, dy, gu):
        f = gu.shape[1] // 2
        g, u = gu[:, :f], gu[:, f:]
        sig = 1.0 / (1.0 + np.exp(-g))
        dgu = good(self, dy, gu)
        dgu[:, :f] -= dy * u * g * sig * (1.0 - sig)  # dg = dy u sig: silu' taken as sig alone
        return dgu
    return bug


def gqa_without_the_group_sum(good):
    def bug(self, dout, qkv, out, ctx, cu_seqlens, n_heads, max_seqlen, n_kv_heads=None):
        H, Hkv = n_heads, n_kv_heads or n_heads
        G, N = H // Hkv, qkv.shape[0]
        heads = qkv.reshape(N, H + 2 * Hkv, -1)
        # the reference kernel on k and v repeated per query head: the group's gradients, each apart ...
        rep = np.concatenate([heads[:, :H], heads[:, H:H + Hkv].repeat(G, axis=1),
                              heads[:, H + Hkv:].repeat(G, axis=1)], axis=1).reshape(N, -1)
        d = good(self, dout, rep, out, ctx, cu_seqlens, H, max_seqlen).reshape(N, 3 * H, -1)
        # ... of which each key/value head keeps its first query head's instead of their sum
        return np.concatenate([d[:, :H], d[:, H:2 * H:G], d[:, 2 * H::G]], axis=1).reshape(qkv.shape)
    return bug


def qk_norm_dropping_the_value_heads(good):
    def bug(self, dout, qkv, wq, wk, rstd, n_heads, n_kv_heads):
        dqkv, dwq, dwk = good(self, dout, qkv, wq, wk, rstd, n_heads, n_kv_heads)
        dqkv[:, (n_heads + n_kv_heads) * wq.shape[0]:] = 0.0  # the value heads passed through: dout is theirs
        return dqkv, dwq, dwk
    return bug


PLANTED = [  # (kernel, the bug, the op study, the llama-block stages that run the kernel, in backward order)
    ("rmsnorm_backward", rmsnorm_with_layernorms_mean_term, "rmsnorm", ["layers.0.ln2", "layers.0.ln1"]),
    ("rope_backward", rope_backward_by_plus_theta, "rope", ["layers.0.qkvr"]),
    ("swiglu_backward", swiglu_without_the_g_sigma_prime_term, "swiglu", ["layers.0.act"]),
    ("attention_backward", gqa_without_the_group_sum, "gqa", ["layers.0.atty"]),
    ("qk_norm_backward", qk_norm_dropping_the_value_heads, "qk_norm", []),  # Llama's block has no q/k norm
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kernel, plant, op, block_stages", PLANTED, ids=[p[2] for p in PLANTED])
def test_a_planted_bug_is_caught_at_its_stage_with_a_nonzero_exit(capsys, monkeypatch, kernel, plant, op,
                                                                   block_stages, seed):
    monkeypatch.setattr(nb.NumpyBackend, kernel, plant(getattr(nb.NumpyBackend, kernel)))
    rc, out = run_study(capsys, op, "--seed", str(seed))
    assert rc == 1
    # the op's own stages are written out apart from the kernel: they pass, the kernel fails against them
    assert failed_stages(out) == []
    name = S.study(op).kernel.name
    assert re.search(r"backward vs finite differences: d\S+ +error \S+ \(<= 1e-07\) FAILED", out)
    assert f"FAILED: {name} backward = stages" in out
    if not block_stages:
        return
    rc, out = run_study(capsys, "llama-block", "--seed", str(seed))
    assert rc == 1
    assert failed_stages(out) == block_stages  # each stage is checked on the gradient that reached it
    assert "llama block (end to end) backward vs finite differences: dx" in out.split("FAILED:")[-1]


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
@pytest.mark.parametrize("op", S.LLAMA_OPS)
def test_torch_shows_autograd_gradients_beside_ours(capsys, op):
    rc, out = run_study(capsys, op, "--torch")
    assert rc == 0, out
    torch_part = out.split("PyTorch autograd on the same inputs and output gradient")[1]
    s = S.study(op)
    for n in [*s.leaves, *(("q", "k", "v", "kr", "vr", "scores", "p") if op == "gqa" else ())]:
        assert re.search(rf"\n  d{re.escape(n)} .*ours vs autograd: error [0-9.e+-]+ \(<= 1e-10\) ok", torch_part), n


@pytest.mark.parametrize("args, message", [
    (["gqa", "--heads", "4", "--kv-heads", "4"], "gqa needs groups of 2 or more query heads"),
    (["gqa", "--heads", "4", "--kv-heads", "3"], "--kv-heads must divide --heads, got 3 and 4"),
    (["rope", "--head-dim", "2"], "rope needs --head-dim of 4 or more"),
    (["rope", "--lengths", "1,1"], "a sequence of 2 or more positions"),
    (["llama-block", "--head-dim", "3"], "RoPE rotates pairs: --head-dim must be even, got 3"),
    (["attention", "--kv-heads", "1"], "--kv-heads is for rope, gqa, qk_norm, llama-block; attention has no"),
    (["rmsnorm", "--kv-heads", "1"], "--kv-heads is for rope, gqa, qk_norm, llama-block; rmsnorm has no"),
])
def test_inputs_that_would_hide_a_bug_class_are_refused_in_one_line(capsys, args, message):
    assert main(["study", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
