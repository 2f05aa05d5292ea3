"""LoRA training step vs full fine-tuning step: time and peak RSS, each contender in a fresh process.

One step = clear gradients, forward, backward, AdamW (minisft.bench's recipe) on B x T random tokens.
Peak RSS is the training peak: the kernel's high-water mark is reset (/proc/self/clear_refs) once the
model is built, so the transient copy of the weights while loading does not count; the full process
peak is printed too.

    flock /tmp/minisft-bench.lock python tools/lora_bench.py --models gpt2-small gpt2-medium
    flock /tmp/minisft-bench.lock python tools/lora_bench.py --models gpt2-xl --modes book-7.4
    python tools/lora_bench.py --models smollm2-135m --modes llama-all-r16 --backend peft-bf16 --seq-len 256
"""
import argparse
import json
import subprocess
import sys
import time

MODES = {  # name -> LoRA settings (None: full fine-tuning)
    "full": None,
    "c_attn-r8": dict(rank=8, alpha=16.0, targets=("c_attn",)),
    "book-7.4": dict(rank=16, alpha=16.0, targets=("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "lm_head")),
    # the Llama family: rank 16 on every linear of the blocks (PEFT's names), the head left frozen
    "llama-all-r16": dict(rank=16, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj")),
}


class LazyWeights(dict):
    """Random float32 weights made on access, one tensor at a time, so building the model never holds
    a second copy of it (the values only need to be finite and GPT-2-sized for timing)."""

    def __init__(self, shapes):
        import numpy as np
        # each value a zero-stride view of one float: it has the tensor's shape (the model's name and shape
        # check reads it) and holds no memory
        super().__init__((n, np.broadcast_to(np.float32(0), s)) for n, s in shapes.items())
        self.shapes = shapes

    def __getitem__(self, name):
        import numpy as np
        rng = np.random.default_rng(abs(hash(name)) % 2 ** 32)
        return rng.standard_normal(self.shapes[name], dtype=np.float32) * np.float32(0.02)


def vm(key: str) -> float:
    """A /proc/self/status field in MB (VmHWM: peak RSS, VmRSS: current)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def peft_step(cfg, mode: str, backend: str, batch_size: int, seq_len: int, rng):
    """PEFT's LoRA on transformers' own model of the architecture (SDPA, AdamW(fused=True) over the
    adapters; backend peft-bf16: under autocast bfloat16): the peer of a LoRA step."""
    import peft

    from minisft.backends import heap
    from minisft.bench import transformers_model, transformers_train_step
    heap.keep_freed_memory()
    m = MODES[mode]
    model = peft.get_peft_model(transformers_model(cfg, "sdpa"), peft.LoraConfig(
        r=m["rank"], lora_alpha=m["alpha"], target_modules=list(m["targets"]), lora_dropout=0.0))
    trained = [p for p in model.parameters() if p.requires_grad]
    step = transformers_train_step(model, trained, cfg, batch_size, seq_len, rng, autocast=backend == "peft-bf16",
                                   fused=True)
    return step, model.get_nb_trainable_parameters()


def one(model: str, mode: str, backend: str, batch_size: int, seq_len: int, steps: int, dtype="float32") -> dict:
    import numpy as np

    from minisft import lora
    from minisft.batch import pack_padded
    from minisft.bench import LR, WEIGHT_DECAY, peak_rss_mb, random_batch
    from minisft.pretrained import requested_config
    from minisft.model import GPT, param_shapes
    from minisft.optim import AdamW

    cfg = requested_config(model)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    if backend.startswith("peft"):
        step, counts = peft_step(cfg, mode, backend, batch_size, seq_len, rng)
    else:
        gpt = GPT(cfg, backend=backend, dtype=dtype, params=LazyWeights(param_shapes(cfg)))
        if MODES[mode] is not None:
            lora.attach(gpt, lora.LoraConfig(**MODES[mode]), seed=0)
        counts = lora.trainable_parameters(gpt)
        opt = AdamW(gpt, lr=LR, weight_decay=WEIGHT_DECAY)

        def step():
            batch = pack_padded(*random_batch(cfg, batch_size, seq_len, rng), strip=False)
            gpt.zero_grad()
            gpt.forward_backward(batch)
            opt.step()
    build = time.perf_counter() - t0
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM: from here on it is the training peak
    times = []
    for _ in range(steps + 1):  # the first step loads numba's cache and warms the allocator
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return dict(model=model, mode=mode, backend=backend, dtype=dtype, batch_size=batch_size, seq_len=seq_len,
                sec_per_step=float(np.median(times[1:])), step_times=times[1:], first_step_s=times[0],
                train_peak_rss_mb=vm("VmHWM"), process_peak_rss_mb=peak_rss_mb(), build_s=build,
                trainable=counts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["gpt2-small", "gpt2-medium"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--backend", default="numba", help="a minisft backend, or peft / peft-bf16: PEFT on transformers")
    p.add_argument("--dtype", default="float32", help="the minisft backend's dtype")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child process
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.models[0], a.modes[0], a.backend, a.batch_size, a.seq_len, a.steps, a.dtype)))
        return
    rows = []
    for model in a.models:
        for mode in a.modes:
            out = subprocess.run([sys.executable, __file__, "--one", "--models", model, "--modes", mode,
                                  "--backend", a.backend, "--dtype", a.dtype, "--batch-size", str(a.batch_size),
                                  "--seq-len",
                                  str(a.seq_len), "--steps", str(a.steps)], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{model} {mode} failed:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            full = next((x for x in rows if x["model"] == model and x["mode"] == "full"), None)
            ratio = f"{r['sec_per_step'] / full['sec_per_step']:.2f}x" if full else "-"
            rss = f"{r['train_peak_rss_mb'] / full['train_peak_rss_mb']:.2f}x" if full else "-"
            print(f"| {model} | {mode} | {r['trainable']} | {r['sec_per_step']:.3f} | {ratio} | "
                  f"{r['train_peak_rss_mb'] / 1024:.2f} | {rss} | {r['process_peak_rss_mb'] / 1024:.2f} |", flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
