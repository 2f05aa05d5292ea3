"""`minisft bench`'s table, the user-facing benchmark: the machine it ran on (the CPU and its bf16
units, which decide the bf16 rows, and how much of it other processes took meanwhile), one row per
contender with its ratio against the PyTorch peer run in the same table and its MFU against the peak
measured for its dtype. Timings are not checked
(tests never time): only that every figure is there and the ratios are those of the times shown."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minisft.backends import bf16
from tests.conftest import ROOT

pytest.importorskip("torch", reason="the table's PyTorch peer needs torch")


def test_the_table_names_the_machine_and_gives_each_contender_its_ratio_and_mfu():
    out = subprocess.run([sys.executable, "-m", "minisft", "bench", "--model", "gpt2-tiny", "--contenders", "numba",
                          "peer-fused", "--steps", "1", "--warmup", "1", "--threads", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    units = ", ".join(bf16.cpu_bf16_flags()) or "none"
    assert f"cores, bf16 units: {units};" in text
    if bf16.cpuinfo("model name"):
        assert f"Machine: {bf16.cpuinfo('model name')}, " in text
    assert "threads: 1." in text
    if Path("/proc/stat").exists():  # what other processes took of the cores, the contenders' own work left out
        assert re.search(r"; other processes used \d+% of the cores during the table; load average", text)
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[1].replace(",", "").isdigit():
            rows[cells[0]] = cells
    numba, peer = rows["minisft numba float32"], rows["PyTorch autograd fp32, SDPA attention, AdamW(fused=True)"]
    assert peer[3] == "1.00x"
    ms = {name: float(r[1].replace(",", "")) for name, r in (("numba", numba), ("peer", peer))}
    # the ratio of the unrounded times: within what rounding each to 1 ms and the ratio to 0.01 allows
    low, high = (ms["peer"] - 0.5) / (ms["numba"] + 0.5), (ms["peer"] + 0.5) / (ms["numba"] - 0.5)
    assert low - 0.005 <= float(numba[3].rstrip("x")) <= high + 0.005
    for r in (numba, peer):
        assert re.fullmatch(r"\d+\.\d% of float32", r[6])
        assert r[7].endswith(" MB") and float(r[7][:-3].replace(",", "")) > 0
    assert re.search(r"Peaks \(.*\): float32 [\d,]+ GFLOP/s\. Step = [\d.]+ GFLOP", text)
