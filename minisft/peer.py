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

from .batch import IGNORE_INDEX
from .config import LN_EPS, param_shapes


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
        for i in range(cfg.n_layers):
            h = f"h.{i}."
            a = _layernorm(x, P(h + "ln_1.weight"), P(h + "ln_1.bias"))
            qkv = self.linear(h + "attn.c_attn", a, cfg.qkv_bias)
            q, k, v = qkv.split(d, dim=-1)
            q, k, v = (t.view(Bsz, T, H, d // H).transpose(1, 2) for t in (q, k, v))
            if self.attention == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)               # (B, H, T, hd)
            else:
                att = (q @ k.transpose(-2, -1)) / math.sqrt(d // H)                       # (B, H, T, T)
                y = att.masked_fill(mask, float("-inf")).softmax(dim=-1) @ v              # (B, H, T, hd)
            y = y.transpose(1, 2).reshape(Bsz, T, d)
            x = x + self.linear(h + "attn.c_proj", y)
            m = _layernorm(x, P(h + "ln_2.weight"), P(h + "ln_2.bias"))
            m = F.gelu(self.linear(h + "mlp.c_fc", m), approximate="tanh")
            x = x + self.linear(h + "mlp.c_proj", m)
        return _layernorm(x, P("ln_f.weight"), P("ln_f.bias"))

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
