"""A PyTorch-autograd GPT-2 written the ordinary way: the peer our hand-written engine is checked
against (tests) and timed against (benchmarks). Its parameters use the same HF names and Conv1D
layouts, so weights copy across by name. Imported only where torch is available.

attention="math" spells the softmax attention out (the book's model, and what the parity tests
differentiate); attention="sdpa" calls F.scaled_dot_product_attention, whose fused CPU kernel (flash
attention, bfloat16 under autocast) is what a PyTorch user would pick for speed: the benchmark peers
use it.
"""
import math

import torch
import torch.nn.functional as F


def _layernorm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps=1e-5)


class TorchGPT(torch.nn.Module):
    def __init__(self, cfg, dtype=torch.float32, device="cpu", attention="math"):
        super().__init__()
        if attention not in ("math", "sdpa"):
            raise ValueError(f"TorchGPT attention must be 'math' or 'sdpa', got {attention!r}")
        self.cfg, self.attention = cfg, attention
        from minisft.model import param_shapes
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
            qkv = a @ P(h + "attn.c_attn.weight")
            if cfg.qkv_bias:
                qkv = qkv + P(h + "attn.c_attn.bias")
            q, k, v = qkv.split(d, dim=-1)
            q, k, v = (t.view(Bsz, T, H, d // H).transpose(1, 2) for t in (q, k, v))
            if self.attention == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)               # (B, H, T, hd)
            else:
                att = (q @ k.transpose(-2, -1)) / math.sqrt(d // H)                       # (B, H, T, T)
                y = att.masked_fill(mask, float("-inf")).softmax(dim=-1) @ v              # (B, H, T, hd)
            y = y.transpose(1, 2).reshape(Bsz, T, d)
            x = x + y @ P(h + "attn.c_proj.weight") + P(h + "attn.c_proj.bias")
            m = _layernorm(x, P(h + "ln_2.weight"), P(h + "ln_2.bias"))
            m = F.gelu(m @ P(h + "mlp.c_fc.weight") + P(h + "mlp.c_fc.bias"), approximate="tanh")
            x = x + m @ P(h + "mlp.c_proj.weight") + P(h + "mlp.c_proj.bias")
        return _layernorm(x, P("ln_f.weight"), P("ln_f.bias"))

    def forward(self, idx):
        head = self.P("wte.weight" if self.cfg.tie_embeddings else "lm_head.weight")
        return self.hidden(idx) @ head.T  # (B, T, V)

    def loss(self, idx, targets):
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
