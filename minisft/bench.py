"""Train-step measurements: the one timing harness behind `minisft bench`, benchmarks/ and tools/.

One step = clear gradients, forward, backward, AdamW update (lr 5e-5, weight decay 0.1, the book's
recipe), on B sequences of T random tokens with every target valid. The contenders (CONTENDERS):

    numpy, numba, torch     minisft on that backend, float32
    numba-bf16, torch-bf16  minisft mixed precision: bfloat16 matmuls, float32 master weights
    peer        minisft.peer.TorchGPT, PyTorch autograd written the ordinary way, with the book's
                attention (masked softmax) and torch.optim.AdamW at its defaults: the book's loop
    peer-fused  the strongest float32 PyTorch a user would pick on a CPU: the same model with
                F.scaled_dot_product_attention (fused flash kernel) and torch.optim.AdamW(fused=True),
                and the heap keeping freed memory (PyTorch's advice of a caching allocator; the same
                setting minisft's CPU backends make, backends/heap.py): 25% off a step here
    peer-bf16   peer-fused under torch.autocast("cpu", torch.bfloat16): bfloat16 matmuls and attention
                through oneDNN, float32 master weights and optimizer
    matmuls     only the step's matmuls, numpy float32 on preallocated operands: the floor no
                float32 contender that leaves its matmuls to BLAS can go below

FLOPs of one step (stated once, used for every MFU figure):

    6 * P * tokens + 12 * n_layers * d * sum_s(L_s^2)

P = the weights that multiply activations: 12 d^2 per block plus the V x d output head (biases,
layernorms and the embedding lookups are not matmuls). The second term is attention's QK^T and PV
(4 d L^2 per layer and sequence forward, counted square as PaLM's accounting does, times 3 for
forward + backward). gpt2-small, B=8, T=64: 383 GFLOP per step.

MFU = (step FLOPs / step time) / the machine's matmul peak for the contender's dtype, measured here
on the shapes the step itself runs (best of the shapes): float32 as numpy's sgemm, bfloat16 as the
best of the bf16 GEMMs installed (minisft's oneDNN wrapper, torch's matmul).

Run one contender in a fresh process (clean peak RSS, no thread pools of another library):
    python -m minisft bench --backend numba --steps 5
and the whole table (each contender in its own process, rounds rotated): `minisft bench`.
"""
import importlib.util
import os
import resource
import time
from pathlib import Path

import numpy as np

from .backends import bf16
from .batch import pack_padded
from .config import GPTConfig
from .config import init_params
from .family import family_of, param_shapes
from .llama import LlamaConfig, hf_config
from .model import GPT
from .optim import AdamW
from .pretrained import requested_config

# name -> (label in tables, the dtype its matmuls run in: which peak its MFU is against)
CONTENDERS = {
    "numpy": ("minisft numpy float32", "float32"),
    "numba": ("minisft numba float32", "float32"),
    "numba-bf16": ("minisft numba bfloat16 (oneDNN GEMMs)", "bfloat16"),
    "torch": ("minisft torch (cpu) float32", "float32"),
    "torch-bf16": ("minisft torch (cpu) bfloat16", "bfloat16"),
    "peer": ("PyTorch autograd fp32, book-style (masked-softmax attention, AdamW defaults)", "float32"),
    "peer-fused": ("PyTorch autograd fp32, SDPA attention, AdamW(fused=True)", "float32"),
    "peer-bf16": ("PyTorch autograd, autocast bf16, SDPA attention, AdamW(fused=True)", "bfloat16"),
    "matmuls": ("the step's matmuls alone (numpy float32)", "float32"),
}
KINDS = tuple(CONTENDERS)
# What `minisft bench` runs by default: the numpy reference (~12 s a step) and the matmul floor only on request.
TABLE_DEFAULT = ("numba", "numba-bf16", "torch", "torch-bf16", "peer", "peer-fused", "peer-bf16")
MINISFT = {"numpy": ("numpy", "float32"), "numba": ("numba", "float32"), "numba-bf16": ("numba", "bfloat16"),
           "torch": ("torch", "float32"), "torch-bf16": ("torch", "bfloat16")}
LR, WEIGHT_DECAY = 5e-5, 0.1


def available(kind: str) -> str | None:
    """None when the contender can run here, else why not."""
    if (kind.startswith(("torch", "peer"))) and importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    if kind == "numba-bf16":
        from .backends.bf16 import problem
        return problem()
    return None


def block_linears(cfg) -> list:
    """(name, in, out) of one block's linear weights: its 2-D tensors (Conv1D layout), either family."""
    prefix = family_of(cfg).layer.format(0)
    return [(n.removeprefix(prefix).removesuffix(".weight"), *s) for n, s in param_shapes(cfg).items()
            if n.startswith(prefix) and len(s) == 2]


def matmul_params(cfg) -> int:
    """GPT-2: 12 d^2 per block; the Llama family: d W + H hd d + 3 d f per block; plus the V x d head."""
    return cfg.n_layers * sum(k_in * k_out for _, k_in, k_out in block_linears(cfg)) + cfg.vocab_size * cfg.emb_dim


def step_flops(cfg, seqlens) -> float:
    tokens = int(np.sum(seqlens))
    attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * float(np.sum(np.square(seqlens, dtype=np.float64)))
    return 6.0 * matmul_params(cfg) * tokens + attn


def gemm_shapes(cfg, n: int):
    """The matmuls of one train step on n positions: (what, M, K, N, a transposed, b transposed).
    Linear y = x @ W (n, in) @ (in, out); its backward dx = dy @ W^T and dW = x^T @ dy. The head
    logits = h @ Wh^T, dh = dlogits @ Wh, dWh = dlogits^T @ h."""
    d, V = cfg.emb_dim, cfg.vocab_size
    shapes = []
    for what, k_in, k_out in block_linears(cfg):
        shapes += [(f"{what} fwd", n, k_in, k_out, False, False),
                   (f"{what} dx", n, k_out, k_in, False, True),
                   (f"{what} dW", k_in, n, k_out, True, False)]
    shapes += [("head fwd", n, d, V, False, True), ("head dh", n, V, d, False, False),
               ("head dW", V, n, d, True, False)]
    return shapes


def sgemm_rates(cfg: GPTConfig, n: int, reps: int = 3, seed: int = 0) -> dict:
    """GFLOP/s of numpy float32 matmul for each shape of gemm_shapes (best of reps)."""
    rng = np.random.default_rng(seed)
    rates = {}
    for what, M, K, N, ta, tb in gemm_shapes(cfg, n):
        a = rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32)
        b = rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32)
        a, b = (a.T if ta else a), (b.T if tb else b)
        out = np.empty((M, N), dtype=np.float32)
        np.matmul(a, b, out=out)
        best = min(_timed(lambda a=a, b=b, out=out: np.matmul(a, b, out=out)) for _ in range(reps))
        rates[what] = 2.0 * M * K * N / best / 1e9
    return rates


def matmuls_step(cfg: GPTConfig, n: int, rng):
    """Only the matmuls of one train step (every layer's and the head's, numpy float32, operands
    preallocated): the time a step could take if everything else were free."""
    gemms = []
    for what, M, K, N, ta, tb in gemm_shapes(cfg, n):
        a = rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32)
        b = rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32)
        gemms.append(((a.T if ta else a), (b.T if tb else b), np.empty((M, N), dtype=np.float32),
                      1 if what.startswith("head") else cfg.n_layers))

    def step():
        for a, b, out, count in gemms:
            for _ in range(count):
                np.matmul(a, b, out=out)
    return step


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def random_batch(cfg: GPTConfig, batch_size: int, seq_len: int, rng):
    x = rng.integers(0, cfg.vocab_size, size=(batch_size, seq_len))  # (B, T)
    y = rng.integers(0, cfg.vocab_size, size=(batch_size, seq_len))  # (B, T)
    return x, y


def make_step(kind: str, cfg: GPTConfig, batch_size: int, seq_len: int, seed: int = 0, device=None):
    """A callable running one train step of `kind` on a fresh random batch each call."""
    rng = np.random.default_rng(seed)
    if kind == "matmuls":
        return matmuls_step(cfg, batch_size * seq_len, rng)
    if kind.startswith("peer") and isinstance(cfg, LlamaConfig):
        return transformers_step(kind, cfg, batch_size, seq_len, rng)
    if kind.startswith("peer"):
        import torch  # the peers only: minisft itself never needs torch

        from .backends import heap
        from .peer import TorchGPT
        if kind != "peer":  # the book's loop stays as the book runs it
            heap.keep_freed_memory()
        model = TorchGPT(cfg, attention="math" if kind == "peer" else "sdpa")
        model.load_numpy({n: a.astype(np.float32) for n, a in init_params(cfg, rng).items()})
        fused = {} if kind == "peer" else {"fused": True}
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, **fused)
        autocast = kind == "peer-bf16"

        def step():
            x, y = (torch.from_numpy(a) for a in random_batch(cfg, batch_size, seq_len, rng))
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model.loss(x, y)
            loss.backward()
            opt.step()
            return loss.item()
        return step

    backend, dtype = MINISFT[kind]
    model = GPT(cfg, backend=backend, dtype=dtype, seed=seed, device=device)
    opt = AdamW(model, lr=LR, weight_decay=WEIGHT_DECAY)

    def step():
        batch = pack_padded(*random_batch(cfg, batch_size, seq_len, rng), strip=False)
        model.zero_grad()
        loss_sum, n = model.forward_backward(batch)
        opt.step()
        return loss_sum / n
    return step


def transformers_step(kind: str, cfg: LlamaConfig, batch_size: int, seq_len: int, rng):
    """The Llama family's PyTorch peers are transformers' own model of the architecture (random init):
    eager attention and AdamW's defaults for `peer`, SDPA and AdamW(fused=True) for the others, under
    autocast bfloat16 for peer-bf16."""
    from .backends import heap
    if kind != "peer":
        heap.keep_freed_memory()
    model = transformers_model(cfg, "eager" if kind == "peer" else "sdpa")
    return transformers_train_step(model, model.parameters(), cfg, batch_size, seq_len, rng,
                                   autocast=kind == "peer-bf16", fused=kind != "peer")


def transformers_model(cfg: LlamaConfig, attention: str):
    """transformers' own model of a Llama-family shape (its HF class), random init, torch seeded 0."""
    import torch
    import transformers
    conf = transformers.AutoConfig.for_model(**hf_config(cfg))
    torch.manual_seed(0)
    return getattr(transformers, hf_config(cfg)["architectures"][0])._from_config(conf, attn_implementation=attention)


def transformers_train_step(model, trained, cfg, batch_size: int, seq_len: int, rng, autocast: bool, fused: bool):
    """A callable running one step of a torch model on a fresh random batch: cross-entropy over every
    position (as minisft's step), backward, torch.optim.AdamW over `trained`."""
    import torch
    opt = torch.optim.AdamW(trained, lr=LR, weight_decay=WEIGHT_DECAY, **({"fused": True} if fused else {}))

    def step():
        x, y = (torch.from_numpy(a) for a in random_batch(cfg, batch_size, seq_len, rng))
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=x).logits                                      # (B, T, V)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size).float(), y.reshape(-1))
        loss.backward()
        opt.step()
        return loss.item()
    return step


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def sgemm_peak(model: str = "gpt2-small", batch_size: int = 8, seq_len: int = 64) -> dict:
    """The machine's float32 matmul rate on the step's own shapes: {kind, rates per shape, peak}."""
    rates = sgemm_rates(requested_config(model), batch_size * seq_len)
    return dict(kind="sgemm", rates=rates, peak=max(rates.values()))


def bf16_rates(cfg: GPTConfig, n: int, library: str, reps: int = 3, seed: int = 0) -> dict:
    """GFLOP/s of a bfloat16 GEMM (bf16 operands, float32 products) for each shape of gemm_shapes:
    library "onednn" (minisft's wrapper, backends/bf16.py) or "torch" (torch.matmul on bf16 tensors)."""
    rng = np.random.default_rng(seed)
    rates = {}
    for what, M, K, N, ta, tb in gemm_shapes(cfg, n):
        a = rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32)
        b = rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32)
        if library == "torch":
            import torch
            at, bt = torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16()
            at, bt = (at.T if ta else at), (bt.T if tb else bt)
            fn = lambda at=at, bt=bt: at @ bt  # noqa: E731
        else:
            ab, bb, out = bf16.to_bf16(a), bf16.to_bf16(b), np.empty((M, N), dtype=np.float32)
            ab, bb = (ab.T if ta else ab), (bb.T if tb else bb)
            fn = lambda ab=ab, bb=bb, out=out: bf16.gemm(ab, bb, out)  # noqa: E731
        fn()
        rates[what] = 2.0 * M * K * N / min(_timed(fn) for _ in range(reps)) / 1e9
    return rates


def bf16_peak(model: str = "gpt2-small", batch_size: int = 8, seq_len: int = 64) -> dict:
    """The machine's bfloat16 matmul rate on the step's own shapes, the best of every bf16 GEMM
    installed: {kind, rates per library and shape, peak}; peak None when there is none."""
    from .backends.bf16 import problem
    cfg, rates = requested_config(model), {}
    if problem() is None:
        rates["onednn"] = bf16_rates(cfg, batch_size * seq_len, "onednn")
    if importlib.util.find_spec("torch") is not None:
        rates["torch"] = bf16_rates(cfg, batch_size * seq_len, "torch")
    best = [max(r.values()) for r in rates.values()]
    return dict(kind="bf16gemm", rates=rates, peak=max(best) if best else None)


def measure(kind: str, model: str = "gpt2-small", batch_size: int = 8, seq_len: int = 64,
            steps: int = 5, warmup: int = 1, device=None) -> dict:
    """Median step time of `steps` timed steps after `warmup`; tokens/s and MFU use it."""
    cfg = requested_config(model)
    t0 = time.perf_counter()
    step = make_step(kind, cfg, batch_size, seq_len, device=device)
    build = time.perf_counter() - t0
    first = [_timed(step) for _ in range(warmup)]  # the first includes numba's compile or cache load
    times = [_timed(step) for _ in range(steps)]
    sec = float(np.median(times))
    flops = step_flops(cfg, [seq_len] * batch_size)
    return dict(kind=kind, model=model, batch_size=batch_size, seq_len=seq_len, steps=steps,
                sec_per_step=sec, step_times=times, tokens_per_s=batch_size * seq_len / sec,
                gflops_per_s=flops / sec / 1e9, step_gflop=flops / 1e9, build_s=build,
                first_step_s=first[0] if first else None,
                peak_rss_mb=peak_rss_mb(), threads=os.cpu_count())


# ---- the whole table: every contender in its own process, rounds rotated ---------------------------
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def run_one(args: list, env=None) -> dict:
    """`python -m minisft bench --json ARGS` in a fresh process -> its measurement."""
    import json
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "minisft", "bench", "--json", *args], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"minisft bench {' '.join(args)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


OTHER_WORK_LOADED = 0.10  # other processes' share of the cores above which the table says LOADED


def cpu_seconds() -> tuple:
    """(every process's busy CPU seconds since boot, this process's and its children's): their growth
    over a table apart is what other work took. (None, ...) where /proc/stat is missing (not Linux)."""
    mine = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))
    try:  # the first line: cpu user nice system idle iowait irq softirq steal ...
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None, mine
    busy = sum(int(fields[i]) for i in (0, 1, 2, 5, 6, 7))  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK"), mine


def table(contenders, model="gpt2-small", batch_size=8, seq_len=64, rounds=1, steps=3, warmup=1,
          threads=None, progress=None) -> str:
    """A markdown table of whole-step times for every contender that can run here, each in a fresh
    process per round (order rotated from round to round, so load that drifts hits all alike), with
    ratios against the PyTorch peers and MFU against the measured peak of each contender's dtype."""
    import datetime
    import platform
    env = dict(os.environ, **{v: str(threads) for v in THREAD_VARS}) if threads else None
    kinds = [k for k in contenders if not available(k)]
    skipped = {k: available(k) for k in contenders if available(k)}
    common = ["--model", model, "--batch-size", str(batch_size), "--seq-len", str(seq_len)]
    dtypes = {CONTENDERS[k][1] for k in kinds}
    load_before, (busy0, mine0), wall0 = os.getloadavg()[0], cpu_seconds(), time.perf_counter()
    times, rss, peaks = {k: [] for k in kinds}, {k: 0.0 for k in kinds}, {"float32": [], "bfloat16": []}
    gflop = step_gflop(model, batch_size, seq_len)
    for r in range(rounds):
        peaks["float32"].append(run_one(["--backend", "sgemm", *common], env)["peak"])
        if "bfloat16" in dtypes:
            peaks["bfloat16"].append(run_one(["--backend", "bf16gemm", *common], env)["peak"])
        for k in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
            res = run_one(["--backend", k, "--steps", str(steps), "--warmup", str(warmup), *common], env)
            times[k] += res["step_times"]
            rss[k] = max(rss[k], res["peak_rss_mb"])
            if progress:
                progress(f"round {r + 1}/{rounds} {k}: {np.median(res['step_times']) * 1e3:,.0f} ms/step")
    load_after, (busy1, mine1), wall = os.getloadavg()[0], cpu_seconds(), time.perf_counter() - wall0
    # other processes' share of the cores: the load average alone counts the contenders themselves
    other = None if busy0 is None else max(0.0, (busy1 - busy0) - (mine1 - mine0)) / (wall * (os.cpu_count() or 1))
    peak = {dt: float(np.median(v)) for dt, v in peaks.items() if v and None not in v}
    sec = {k: float(np.median(v)) for k, v in times.items()}
    tokens = batch_size * seq_len
    if other is None:
        loaded, said = max(load_before, load_after) > 0.5 * (os.cpu_count() or 1), ""
    else:
        loaded, said = other > OTHER_WORK_LOADED, f"other processes used {other:.0%} of the cores during the table; "
    lines = [f"### {model} train step, B={batch_size} T={seq_len}, AdamW ({datetime.date.today().isoformat()})", "",
             f"Machine: {bf16.cpuinfo('model name') or platform.processor() or platform.machine()}, {os.cpu_count()} "
             f"cores, bf16 units: {', '.join(bf16.cpu_bf16_flags()) or 'none'}; {said}load average "
             f"{load_before:.1f} before, {load_after:.1f} after "
             f"({'LOADED: other work was running' if loaded else 'quiet'}). Median over {rounds} round(s) x "
             f"{steps} steps per contender, each in a fresh process; threads: {threads or 'library defaults'}.", "",
             "| contender | ms/step | tokens/s | vs PyTorch fp32 | vs PyTorch bf16 | GFLOP/s | MFU | peak RSS |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k in kinds:
        label, dt = CONTENDERS[k]
        vs = [f"{sec[p] / sec[k]:.2f}x" if p in sec else "-" for p in ("peer-fused", "peer-bf16")]
        gf = gflop / sec[k]
        mfu = f"{gf / peak[dt]:.1%} of {dt}" if dt in peak else "-"
        lines.append(f"| {label} | {sec[k] * 1e3:,.0f} | {tokens / sec[k]:,.0f} | {vs[0]} | {vs[1]} | {gf:,.1f} | "
                     f"{mfu} | {rss[k]:,.0f} MB |")
    for k, why in skipped.items():
        lines.append(f"| {CONTENDERS[k][0]} | skipped: {why} | | | | | | |")
    lines += ["", "Peaks (median over rounds, best of the step's own matmul shapes): " + ", ".join(
        f"{dt} {v:,.0f} GFLOP/s" for dt, v in peak.items()) + f". Step = {gflop:.1f} GFLOP (minisft/bench.py)."]
    return "\n".join(lines)


def step_gflop(model: str, batch_size: int, seq_len: int) -> float:
    return step_flops(requested_config(model), [seq_len] * batch_size) / 1e9
