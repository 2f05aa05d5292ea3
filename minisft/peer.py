"""A PyTorch-autograd GPT-2 written the ordinary way: the peer our hand-written engine is checked
against (tests) and timed against (benchmarks, `minisft bench`). Its parameters use the same HF names and Conv1D
layouts, so weights copy across by name. Imported only when a peer is asked for: minisft itself never needs torch.

attention="math" spells the softmax attention out (the book's model, and what the parity tests
differentiate); attention="sdpa" calls F.scaled_dot_product_attention, whose fused CPU kernel (flash
attention, bfloat16 under autocast) is what a PyTorch user would pick for speed: the benchmark peers
use it.
"""
import math

import torch
import torch.nn.functional as F

from . import block
from .batch import IGNORE_INDEX
from .backends.constants import LN_EPS
from .config import param_shapes


def _layernorm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps=LN_EPS)


class TorchGPT(torch.nn.Module):
    def __init__(self, cfg, dtype=torch.float32, device="cpu", attention="math"):
        super().__init__()
        if attention not in ("math", "sdpa"):
            raise ValueError(f"TorchGPT attention must be 'math' or 'sdpa', got {attention!r}")
        self.cfg, self.attention = cfg, attention
        self.p = torch.nn.ParameterDict({
            name.replace(".", "__"): torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
            for name, shape in param_shapes(cfg).items()})

    def P(self, name):
        return self.p[name.replace(".", "__")]

    def load_numpy(self, sd):
        with torch.no_grad():
            for name, a in sd.items():
                self.P(name).copy_(torch.from_numpy(a))

    def grads_numpy(self):
        return {k.replace("__", "."): v.grad.detach().cpu().double().numpy() for k, v in self.p.items()}

    def hidden(self, idx):
        """idx (B, T) -> final layernorm output (B, T, d), padded causal attention (the book's model)."""
        cfg, P = self.cfg, self.P
        Bsz, T = idx.shape
        H, d = cfg.n_heads, cfg.emb_dim
        x = P("wte.weight")[idx] + P("wpe.weight")[torch.arange(T, device=idx.device)]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool, device=idx.device), diagonal=1)

        def attention(st, qkv):
            q, k, v = qkv.split(d, dim=-1)
            q, k, v = (t.view(Bsz, T, H, d // H).transpose(1, 2) for t in (q, k, v))
            if self.attention == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)               # (B, H, T, hd)
            else:
                att = (q @ k.transpose(-2, -1)) / math.sqrt(d // H)                       # (B, H, T, T)
                y = att.masked_fill(mask, float("-inf")).softmax(dim=-1) @ v              # (B, H, T, hd)
            return y.transpose(1, 2).reshape(Bsz, T, d)
        for i in range(cfg.n_layers):  # minisft.block's stages, each through PyTorch's own op
            x = block.run(self._ops(f"h.{i}.", attention), x)
        return _layernorm(x, P("ln_f.weight"), P("ln_f.bias"))

    def _ops(self, h, attention) -> dict:
        """The ops of block h (= "h.{i}.") for minisft.block.run."""
        def linear(st, x):
            bias = block.params(st, h)[1].replace(".", "__") in self.p  # no c_attn bias: the book's config
            return self.linear(h + st.module, x, bias)
        return {"layernorm": lambda st, x: _layernorm(x, *(self.P(n) for n in block.params(st, h))),
                "linear": linear, "attention": attention,
                "gelu": lambda st, x: F.gelu(x, approximate="tanh"),
                "residual": lambda st, x, y: x + y}

    def linear(self, module, x, bias=True):
        """A Conv1D layer: x @ W (+ b)."""
        y = x @ self.P(module + ".weight")
        return y + self.P(module + ".bias") if bias else y

    def head(self, h):
        return h @ self.P("wte.weight" if self.cfg.tie_embeddings else "lm_head.weight").T  # (B, T, V)

    def forward(self, idx):
        return self.head(self.hidden(idx))

    def loss(self, idx, targets):
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


class TorchLoraGPT(TorchGPT):
    """TorchGPT with LoRA written the ordinary way (as PEFT's forward, no dropout): every adapted layer
    adds scale * (x @ A) @ B into its output's column slice; autograd derives the gradients.
    parts: minisft.lora.Part records (module, col, n_out, scale), adapters named as minisft names them."""

    def __init__(self, cfg, parts, dtype=torch.float32, device="cpu"):
        super().__init__(cfg, dtype, device)
        self.parts = parts
        self.lora = torch.nn.ParameterDict({
            n.replace(".", "__"): torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
            for p in parts for n, shape in ((p.a, (p.n_in, p.rank)), (p.b, (p.rank, p.n_out)))})

    def L(self, name):
        return self.lora[name.replace(".", "__")]

    def load_adapters(self, arrays):
        with torch.no_grad():
            for name, a in arrays.items():
                self.L(name).copy_(torch.from_numpy(a))

    def adapter_grads_numpy(self):
        return {k.replace("__", "."): v.grad.detach().cpu().double().numpy() for k, v in self.lora.items()}

    def _update(self, module, x, y):
        for p in self.parts:
            if p.module == module:
                delta = p.scale * (x @ self.L(p.a)) @ self.L(p.b)
                pad = (p.col, y.shape[-1] - p.col - p.n_out)
                y = y + F.pad(delta, pad)  # the part's column slice of y
        return y

    def linear(self, module, x, bias=True):
        return self._update(module, x, super().linear(module, x, bias))

    def head(self, h):
        return self._update("lm_head", h, super().head(h))
