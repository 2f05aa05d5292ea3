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
    qk_norm = (Stage("qkvn", "qk_norm", ("qkv",), "self_attn", tensors=("q_norm.weight", "k_norm.weight"),
                     forward="qkvn = per-head rmsnorm of q and k (q_norm, k_norm)",
                     backward="dqkv, dwq, dwk = qk_norm_backward(dqkvn)"),) if cfg.qk_norm else ()
    rope_in = "qkvn" if cfg.qk_norm else "qkv"
    return (
        Stage("ln1", "rmsnorm", ("x",), "input_layernorm", tensors=("weight",),
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
        Stage("ln2", "rmsnorm", ("x2",), "post_attention_layernorm", tensors=("weight",),
              forward="ln2 = rmsnorm(x2; post_attention_layernorm)", backward="dx2, dw = rmsnorm_backward(dln2)"),
        Stage("gu", "linear", ("ln2",), "mlp.gate_up_proj",
              forward="gu = ln2 @ [gate_proj | up_proj]   (N, 2f)", backward="dln2 = dgu @ wT;  dw = ln2T @ dgu"),
        Stage("act", "swiglu", ("gu",),
              forward="act = silu(gate) * up   (N, f)", backward="dgu = swiglu_backward(dact)"),
        Stage("mlpout", "linear", ("act",), "mlp.down_proj",
              forward="mlpout = act @ down_proj", backward="dact = dmlpout @ wT;  dw = actT @ dmlpout"),
        Stage("out", "residual", ("x2", "mlpout"),
              forward="out = x2 + mlpout   (the next block's x)", backward="dx2 = dout;  dmlpout = dout"),
    )


def param_shapes(cfg: LlamaConfig) -> dict:
    """minisft's parameter name -> shape, Hugging Face's order (names without the `model.` prefix)."""
    V, d, f, hd, W = cfg.vocab_size, cfg.emb_dim, cfg.ffn_dim, cfg.head_dim, cfg.qkv_dim
    shapes: dict[str, tuple] = {"embed_tokens.weight": (V, d)}
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


# ---- Hugging Face names and config ------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Where a Hugging Face tensor lives in minisft's: columns [start, stop) of `ours` (the whole
    tensor when stop is 0); linear: HF keeps it as nn.Linear (out, in), the transpose of ours."""
    ours: str
    start: int = 0
    stop: int = 0
    linear: bool = False


def hf_layout(cfg: LlamaConfig) -> dict:
    """Hugging Face tensor name -> Piece, in Hugging Face's order, for a model of shape cfg."""
    H, Hkv, hd, f = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    qkv_cols = {"q_proj": (0, H * hd), "k_proj": (H * hd, (H + Hkv) * hd), "v_proj": ((H + Hkv) * hd, cfg.qkv_dim)}
    out = {"model.embed_tokens.weight": Piece("embed_tokens.weight")}
    for i in range(cfg.n_layers):
        hf, p = f"model.layers.{i}.", f"layers.{i}."
        out[hf + "input_layernorm.weight"] = Piece(p + "input_layernorm.weight")
        for name, (a, b) in qkv_cols.items():
            out[hf + f"self_attn.{name}.weight"] = Piece(p + "self_attn.qkv_proj.weight", a, b, linear=True)
            if cfg.qkv_bias:
                out[hf + f"self_attn.{name}.bias"] = Piece(p + "self_attn.qkv_proj.bias", a, b)
        out[hf + "self_attn.o_proj.weight"] = Piece(p + "self_attn.o_proj.weight", linear=True)
        if cfg.qk_norm:
            out[hf + "self_attn.q_norm.weight"] = Piece(p + "self_attn.q_norm.weight")
            out[hf + "self_attn.k_norm.weight"] = Piece(p + "self_attn.k_norm.weight")
        out[hf + "post_attention_layernorm.weight"] = Piece(p + "post_attention_layernorm.weight")
        out[hf + "mlp.gate_proj.weight"] = Piece(p + "mlp.gate_up_proj.weight", 0, f, linear=True)
        out[hf + "mlp.up_proj.weight"] = Piece(p + "mlp.gate_up_proj.weight", f, 2 * f, linear=True)
        out[hf + "mlp.down_proj.weight"] = Piece(p + "mlp.down_proj.weight", linear=True)
    out["model.norm.weight"] = Piece("norm.weight")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = Piece("lm_head.weight")
    return out


def hf_shape(piece: Piece, shape: tuple) -> tuple:
    """The Hugging Face shape of piece, given its minisft tensor's shape."""
    cols = shape[-1] if piece.stop == 0 else piece.stop - piece.start
    return (cols, shape[0]) if piece.linear else tuple(shape[:-1]) + (cols,)


def hf_array(piece: Piece, ours: np.ndarray) -> np.ndarray:
    """The Hugging Face tensor of piece, cut from its minisft tensor."""
    part = ours if piece.stop == 0 else ours[..., piece.start:piece.stop]
    return np.ascontiguousarray(part.T if piece.linear else part)


def from_hf(tensors: dict, cfg: LlamaConfig) -> dict:
    """{Hugging Face name: array} with exactly hf_layout(cfg)'s names -> {minisft name: array}: each fused
    tensor joined from its pieces (transposed to (in, out)) in column order."""
    parts: dict = {}
    for hf, piece in hf_layout(cfg).items():
        parts.setdefault(piece.ours, []).append(tensors[hf].T if piece.linear else tensors[hf])
    return {n: np.concatenate(p, axis=-1) if len(p) > 1 else np.array(p[0]) for n, p in parts.items()}


def config_from_hf(hf: dict) -> LlamaConfig:
    """A Llama, Qwen2 or Qwen3 config.json (already parsed) -> LlamaConfig. Raises ValueError naming the
    field when the file asks for something these kernels do not compute."""
    archs = hf.get("architectures") or []
    arch = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(str(hf.get("model_type")))
    if arch is None or any(a not in ARCHITECTURES for a in archs):
        raise ValueError(f"model_type {hf.get('model_type')!r} / architectures {archs}: minisft runs "
                         f"{', '.join(ARCHITECTURES)} (and GPT-2)")
    for field, want in (("hidden_act", "silu"), ("mlp_bias", False), ("use_sliding_window", False)):
        if hf.get(field, want) != want:
            raise ValueError(f"{field} is {hf[field]!r}; minisft's {arch} computes only {want!r}")
    if arch == "llama" and hf.get("attention_bias", False) is not False:
        raise ValueError("attention_bias is true; minisft's Llama has no q/k/v/o biases")
    if arch == "qwen3" and hf.get("attention_bias", False) is not False:
        raise ValueError("attention_bias is true; minisft's Qwen3 has no q/k/v biases")
    # Transformers 5 writes rope_parameters (rope_theta inside); published files rope_theta + rope_scaling.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"rope_scaling must be an object, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ValueError(f"rope_type {kind!r}: minisft implements the default rotation and 'llama3' scaling")
    scaling = None if kind == "default" else RopeScaling(
        float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
        int(rope["original_max_position_embeddings"]))

    def integer(key, default=None):
        v = hf.get(key, default)
        if type(v) is not int or v <= 0:
            raise ValueError(f"{key} must be a positive integer, got {v!r}")
        return v
    d, H = integer("hidden_size"), integer("num_attention_heads")
    return LlamaConfig(
        vocab_size=integer("vocab_size"), context_length=integer("max_position_embeddings"), emb_dim=d,
        n_layers=integer("num_hidden_layers"), n_heads=H, n_kv_heads=integer("num_key_value_heads", H),
        head_dim=integer("head_dim") if hf.get("head_dim") is not None else d // H,
        ffn_dim=integer("intermediate_size"), rms_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), rope_scaling=scaling,
        qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3", tie_embeddings=hf.get("tie_word_embeddings") is True,
        arch=arch)


def hf_config(cfg: LlamaConfig) -> dict:
    """LlamaConfig -> the config.json of its Hugging Face class, in the published files' form (rope_theta
    and rope_scaling at the top level), which every transformers release reads."""
    name = next(a for a, k in ARCHITECTURES.items() if k == cfg.arch)
    out = {"model_type": cfg.arch, "architectures": [name], "vocab_size": cfg.vocab_size,
           "max_position_embeddings": cfg.context_length, "hidden_size": cfg.emb_dim,
           "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim,
           "hidden_act": "silu", "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta,
           "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "initializer_range": 0.02}
    if cfg.arch != "qwen2":
        out.update(attention_bias=False, mlp_bias=False)
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        out["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_context}
    return out
