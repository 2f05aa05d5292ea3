"""The Llama family: Llama 3.2, SmolLM2, Qwen2.5 and Qwen3 decoders, described once.

What differs from GPT-2 (minisft/block.py) is small and local, so the engine (minisft/model.py) runs
both from their descriptions: RMSNorm instead of layernorm (a weight, no bias, no centring), no
position table (positions rotate the query and key heads instead: RoPE), grouped-query attention
(fewer key/value heads than query heads), a gated SwiGLU MLP, and per model: biases on q/k/v
(Qwen2), a per-head RMSNorm of q and k (Qwen3), an explicit head width, `llama3` rope scaling.

One block, forward (N positions, width d, H query heads, Hkv key/value heads of width hd):

    x (N, d) ─┬─ input_layernorm ─ qkv_proj (N, W) ─[q/k norm]─ rope ─ attention (N, H hd) ─ o_proj ─(+)─ x2
              └────────────────────────────────────────────────────────────────────────────┘
    x2 ───────┬─ post_attention_layernorm ─ gate_up_proj (N, 2f) ─ swiglu (N, f) ─ down_proj ─(+)─ out
              └──────────────────────────────────────────────────────────────────┘

W = (H + 2 Hkv) hd. Hugging Face keeps q_proj, k_proj, v_proj (and gate_proj, up_proj) as separate
nn.Linear weights; minisft stores each group as one fused Conv1D-layout weight (in, out), as GPT-2's
c_attn and Phi-3's qkv_proj/gate_up_proj do, so one GEMM computes all three. The Hugging Face
mapping below splits and transposes them on the way out and joins them on the way in.
"""
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .block import Stage

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's `llama3` rope scaling: long wavelengths slowed by factor, short ones kept, a smooth
    blend between (Hugging Face rope_scaling with rope_type "llama3")."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_context: int


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    context_length: int
    emb_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False        # Qwen2: biases on q_proj, k_proj, v_proj
    qk_norm: bool = False         # Qwen3: RMSNorm of each query and key head before the rotation
    tie_embeddings: bool = True   # the head is embed_tokens itself (every small model of the family)
    arch: str = "llama"           # llama | qwen2 | qwen3: the Hugging Face class it loads and exports as
    drop_rate: float = 0.0        # the family trains without dropout; kept so the engine reads one field

    def __post_init__(self):
        for f in ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                  "ffn_dim"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise ValueError(f"LlamaConfig.{f} must be a positive integer, got {getattr(self, f)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim {self.head_dim} must be even (RoPE rotates pairs)")
        if self.arch not in ARCHITECTURES.values():
            raise ValueError(f"LlamaConfig.arch must be one of {', '.join(ARCHITECTURES.values())}, got {self.arch!r}")
        if not (self.rms_eps > 0 and self.rope_theta > 0):
            raise ValueError("LlamaConfig: rms_eps and rope_theta must be positive")
        if self.drop_rate != 0.0:
            raise ValueError("LlamaConfig.drop_rate: the Llama family trains without dropout")

    @property
    def qkv_dim(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"LlamaConfig: unknown fields {sorted(unknown)}")
        scaling = d.get("rope_scaling")
        return cls(**{**d, "rope_scaling": RopeScaling(**scaling) if isinstance(scaling, dict) else scaling})


# The shapes of the published models (their config.json files); --weights reads the real file.
PRESETS = {
    "smollm2-135m": dict(vocab_size=49152, context_length=8192, emb_dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                         head_dim=64, ffn_dim=1536, rope_theta=100000.0),
    "smollm2-360m": dict(vocab_size=49152, context_length=8192, emb_dim=960, n_layers=32, n_heads=15, n_kv_heads=5,
                         head_dim=64, ffn_dim=2560, rope_theta=100000.0),
    "smollm2-1.7b": dict(vocab_size=49152, context_length=8192, emb_dim=2048, n_layers=24, n_heads=32,
                         n_kv_heads=32, head_dim=64, ffn_dim=8192, rope_theta=130000.0),
    "llama-3.2-1b": dict(vocab_size=128256, context_length=131072, emb_dim=2048, n_layers=16, n_heads=32,
                         n_kv_heads=8, head_dim=64, ffn_dim=8192, rope_theta=500000.0,
                         rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192)),
    "qwen2.5-0.5b": dict(vocab_size=151936, context_length=32768, emb_dim=896, n_layers=24, n_heads=14, n_kv_heads=2,
                         head_dim=64, ffn_dim=4864, rms_eps=1e-6, rope_theta=1000000.0, qkv_bias=True, arch="qwen2"),
    "qwen2.5-1.5b": dict(vocab_size=151936, context_length=32768, emb_dim=1536, n_layers=28, n_heads=12,
                         n_kv_heads=2, head_dim=128, ffn_dim=8960, rms_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
                         arch="qwen2"),
    "qwen3-0.6b": dict(vocab_size=151936, context_length=40960, emb_dim=1024, n_layers=28, n_heads=16, n_kv_heads=8,
                       head_dim=128, ffn_dim=3072, rms_eps=1e-6, rope_theta=1000000.0, qk_norm=True, arch="qwen3"),
    # Every feature of the family at test size: grouped heads, llama3 scaling, an untied head.
    "llama-tiny": dict(vocab_size=512, context_length=256, emb_dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=16, ffn_dim=128, rope_theta=10000.0, rope_scaling=RopeScaling(4.0, 1.0, 4.0, 64),
                       tie_embeddings=False),
}


# ---- the block ------------------------------------------------------------------------------------------
def stages(cfg: LlamaConfig) -> tuple:
    """The block's stages for cfg (Qwen3 adds the q/k norm); the engine walks them as GPT-2's."""
    qk_norm = (Stage("qkvn", "qk_norm", ("qkv",), "self_attn",
                     forward="qkvn = per-head rmsnorm of q and k (q_norm, k_norm)",
                     backward="dqkv, dwq, dwk = qk_norm_backward(dqkvn)"),) if cfg.qk_norm else ()
    rope_in = "qkvn" if cfg.qk_norm else "qkv"
    return (
        Stage("ln1", "rmsnorm", ("x",), "input_layernorm",
              forward="ln1 = rmsnorm(x; input_layernorm)", backward="dx, dw = rmsnorm_backward(dln1)"),
        Stage("qkv", "linear", ("ln1",), "self_attn.qkv_proj",
              forward="qkv = ln1 @ [q_proj | k_proj | v_proj]   (N, W)",
              backward="dln1 = dqkv @ wT;  dw = ln1T @ dqkv"),
        *qk_norm,
        Stage("qkvr", "rope", (rope_in,),
              forward="qkvr = rotate q and k by position * inv_freq", backward=f"d{rope_in} = rotate dqkvr back (-θ)"),
        Stage("atty", "attention", ("qkvr",),
              forward="atty = grouped-query attention(qkvr)   (N, H hd)", backward="dqkvr = attention_backward(datty)"),
        Stage("attproj", "linear", ("atty",), "self_attn.o_proj",
              forward="attproj = atty @ o_proj", backward="datty = dattproj @ wT;  dw = attyT @ dattproj"),
        Stage("x2", "residual", ("x", "attproj"), forward="x2 = x + attproj", backward="dx = dx2;  dattproj = dx2"),
        Stage("ln2", "rmsnorm", ("x2",), "post_attention_layernorm",
              forward="ln2 = rmsnorm(x2; post_attention_layernorm)", backward="dx2, dw = rmsnorm_backward(dln2)"),
        Stage("gu", "linear", ("ln2",), "mlp.gate_up_proj",
              forward="gu = ln2 @ [gate_proj | up_proj]   (N, 2f)", backward="dln2 = dgu @ wT;  dw = ln2T @ dgu"),
        Stage("act", "swiglu", ("gu",), forward="act = silu(gate) * up   (N, f)", backward="dgu = swiglu_backward(dact)"),
        Stage("mlpout", "linear", ("act",), "mlp.down_proj",
              forward="mlpout = act @ down_proj", backward="dact = dmlpout @ wT;  dw = actT @ dmlpout"),
        Stage("out", "residual", ("x2", "mlpout"),
              forward="out = x2 + mlpout   (the next block's x)", backward="dx2 = dout;  dmlpout = dout"),
    )


def param_shapes(cfg: LlamaConfig) -> dict:
    """minisft's parameter name -> shape, Hugging Face's order (names without the `model.` prefix)."""
    V, d, f, hd, W = cfg.vocab_size, cfg.emb_dim, cfg.ffn_dim, cfg.head_dim, cfg.qkv_dim
    shapes = {"embed_tokens.weight": (V, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "self_attn.qkv_proj.weight"] = (d, W)
        if cfg.qkv_bias:
            shapes[p + "self_attn.qkv_proj.bias"] = (W,)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "self_attn.o_proj.weight"] = (cfg.n_heads * hd, d)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "mlp.gate_up_proj.weight"] = (d, 2 * f)
        shapes[p + "mlp.down_proj.weight"] = (f, d)
    shapes["norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, d)
    return shapes


def init_params(cfg: LlamaConfig, rng, dtype) -> dict:
    """Hugging Face's initialisation of the family: every weight normal(0, 0.02) (initializer_range),
    biases 0, norm weights 1. Drawn in float64 and cast per tensor, as minisft.model.init_params."""
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("norm.weight"):
            params[name] = np.ones(shape, dtype=dtype)
        elif name.endswith(".bias"):
            params[name] = np.zeros(shape, dtype=dtype)
        else:
            params[name] = rng.normal(0.0, 0.02, size=shape).astype(dtype, copy=False)
    return params


# ---- rotary position embedding ------------------------------------------------------------------------
def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """The rotation speed of each pair of a head: theta^(-2i/hd) for i < hd/2, then llama3's scaling."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)   # (hd/2,)
    if scaling is None:
        return inv
    wavelen = 2 * math.pi / inv                                                     # (hd/2,)
    low_wavelen = scaling.original_context / scaling.low_freq_factor                # longer than this: slowed
    high_wavelen = scaling.original_context / scaling.high_freq_factor              # shorter than this: kept
    smooth = (scaling.original_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)                         # (hd/2,) 0 -> 1 in between
    blended = (1 - smooth) * inv / scaling.factor + smooth * inv
    return np.where(wavelen > low_wavelen, inv / scaling.factor, np.where(wavelen < high_wavelen, inv, blended))


def rope_tables(head_dim: int, context_length: int, theta: float, scaling: RopeScaling | None):
    """cos, sin (C, hd/2) of angle position * inv_freq, in float64: every position's rotation."""
    angles = np.outer(np.arange(context_length, dtype=np.float64), inv_frequencies(head_dim, theta, scaling))
    return np.cos(angles), np.sin(angles)
