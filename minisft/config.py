"""GPTConfig: the shape of a GPT-2-class model, with the four OpenAI sizes and a tiny one as presets."""
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import MinisftError

GPT2_VOCAB = 50257


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = GPT2_VOCAB
    context_length: int = 1024
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    # False = the book's model: the output head `lm_head.weight` is its own tensor (it starts as a
    # copy of wte when loading OpenAI weights, then trains separately). True = original GPT-2, where
    # the head is wte itself. Every preset is untied, as the book fine-tunes.
    tie_embeddings: bool = False

    def __post_init__(self):
        for f in ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise ValueError(f"GPTConfig.{f} must be a positive integer, got {getattr(self, f)!r}")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"GPTConfig: emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads  # every head has its own keys and values (the Llama family groups them)

    @property
    def qkv_dim(self) -> int:
        return 3 * self.emb_dim

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"GPTConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


PRESETS = {
    "gpt2-small": dict(emb_dim=768, n_layers=12, n_heads=12),     # 124M
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),   # 355M
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),    # 774M
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),       # 1558M
    # Real GPT-2 vocabulary and tokenizer, tiny body: the offline first run and smoke tests.
    "gpt2-tiny": dict(context_length=256, emb_dim=64, n_layers=2, n_heads=4),
}


def param_shapes(cfg: GPTConfig) -> dict:
    """HF GPT-2 parameter name -> shape, in the order Hugging Face lists them."""
    V, C, d = cfg.vocab_size, cfg.context_length, cfg.emb_dim
    shapes = {"wte.weight": (V, d), "wpe.weight": (C, d)}
    for i in range(cfg.n_layers):
        h = f"h.{i}."
        shapes.update({
            h + "ln_1.weight": (d,), h + "ln_1.bias": (d,),
            h + "attn.c_attn.weight": (d, 3 * d), h + "attn.c_attn.bias": (3 * d,),
            h + "attn.c_proj.weight": (d, d), h + "attn.c_proj.bias": (d,),
            h + "ln_2.weight": (d,), h + "ln_2.bias": (d,),
            h + "mlp.c_fc.weight": (d, 4 * d), h + "mlp.c_fc.bias": (4 * d,),
            h + "mlp.c_proj.weight": (4 * d, d), h + "mlp.c_proj.bias": (d,),
        })
    if not cfg.qkv_bias:  # the book's from-scratch config: no query/key/value bias
        for i in range(cfg.n_layers):
            del shapes[f"h.{i}.attn.c_attn.bias"]
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, d)
    return shapes


def init_params(cfg: GPTConfig, rng, dtype=np.float64) -> dict:
    """GPT-2's initialisation: weights normal(0, 0.02), the two residual projections of each block
    scaled by 1/sqrt(2 n_layers) (so the residual stream's variance does not grow with depth),
    biases 0, layernorm gains 1. Returns numpy arrays in dtype, each drawn in float64 and cast on its
    own (the same values as casting the float64 model, without ever holding it: 13 GB for gpt2-xl)."""
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            params[name] = np.ones(shape, dtype=dtype)
        elif name.endswith(".bias"):
            params[name] = np.zeros(shape, dtype=dtype)
        else:
            std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith("c_proj.weight") else 0.02
            params[name] = rng.normal(0.0, std, size=shape).astype(dtype, copy=False)
    return params


def check_tensors(where: str, have: dict, want: dict) -> None:
    """The one "names and shapes match" check for every way tensors enter a model (state dicts,
    weight files, checkpoints, optimizer state). have, want: {name: shape}. Raises a MinisftError
    starting with `where` that names the missing, unexpected or misshapen tensors."""
    missing = [n for n in want if n not in have]
    unexpected = [n for n in have if n not in want]
    if missing or unexpected:
        raise MinisftError(f"{where}: tensor names do not match the model: missing {few(missing)}, "
                           f"unexpected {few(unexpected)}")
    for name, shape in want.items():
        if tuple(have[name]) != tuple(shape):
            raise MinisftError(f"{where}: tensor {name!r} has shape {tuple(have[name])}, the model needs "
                               f"{tuple(shape)}")


def few(names) -> str:
    """The first five names and how many more: error messages stay one line."""
    return "none" if not names else ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
