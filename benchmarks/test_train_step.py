"""End-to-end train step on gpt2-small (B=8, T=64, AdamW), every contender in the same run:
minisft on numpy, numba and (when present) torch-cpu, and the PyTorch-autograd peer. Each result's
extra_info holds tokens/s, achieved GFLOP/s, MFU against this machine's sgemm peak (measured first,
in the same run) and the peak RSS of the process that ran it. FLOPs: see minisft/bench.py.

    python -m pytest benchmarks/test_train_step.py --benchmark-columns=min,median,rounds

Each contender runs in its own subprocess (python -m minisft bench --backend KIND --json): a clean peak RSS,
and no thread pool of one library left spinning while another works. pytest-benchmark times the
whole subprocess; the step figures come from the steps it times inside. For the markdown table with
ratios, interleaved rounds and medians: minisft bench.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minisft.bench import KINDS, available

ROOT = Path(__file__).resolve().parents[1]
STEPS = int(os.environ.get("MINISFT_BENCH_STEPS", "5"))


def run_json(*args) -> dict:
    out = subprocess.run([sys.executable, "-m", "minisft", "bench", "--json", "--backend", *args], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sgemm_peak():
    return run_json("sgemm")["peak"]


@pytest.mark.parametrize("kind", KINDS)
def test_train_step(benchmark, kind, sgemm_peak):
    why = available(kind)
    if why:
        pytest.skip(why)
    res = {}

    def run():
        res.update(run_json(kind, "--steps", str(STEPS)))
    benchmark.group = "gpt2-small train step B=8 T=64"
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(
        tokens_per_s=round(res["tokens_per_s"], 1), ms_per_step=round(res["sec_per_step"] * 1e3, 1),
        gflops_per_s=round(res["gflops_per_s"], 1), sgemm_peak_gflops=round(sgemm_peak, 1),
        mfu=round(res["gflops_per_s"] / sgemm_peak, 3), peak_rss_mb=round(res["peak_rss_mb"]),
        steps=STEPS)
