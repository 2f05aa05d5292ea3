"""Model families: what the engine (minisft/model.py) needs to know of an architecture, in one record.

A family's module describes it (GPT-2: minisft/config.py and minisft/block.py; the Llama family:
minisft/llama.py); the record below names where its tensors live and which functions give its
stages, shapes and initial values. The engine reads nothing else of the architecture, so a new
family is a module, a record here and kernels for the ops it adds.
"""
from dataclasses import dataclass
from typing import Callable

from . import block, llama
from .block import Stage
from .config import GPTConfig, init_params as gpt2_init, param_shapes as gpt2_shapes


@dataclass(frozen=True)
class Family:
    name: str
    embed: str                   # the token embedding (V, d); a tied head is this tensor
    positions: str | None        # the learned position table (C, d), or None: RoPE rotates q and k instead
    layer: str                   # block i's tensor names start with layer.format(i)
    final: Stage                 # the norm after the last block
    stages: Callable             # cfg -> the block's stages
    shapes: Callable             # cfg -> {name: shape}, in Hugging Face's order
    init: Callable               # (cfg, rng, dtype) -> {name: numpy array}: the family's initialisation
    kept: Callable               # cfg -> floats per position one block keeps for its backward (minisft.memory)
    scratch: Callable            # cfg -> floats per position of one block's backward transients


GPT2 = Family("gpt2", "wte.weight", "wpe.weight", "h.{}.",
              Stage("lnf", "layernorm", ("x",), "ln_f", forward="lnf = layernorm(x; ln_f)",
                    backward="dx, dw, db = layernorm_backward(dlnf)"),
              lambda cfg: block.stages(), gpt2_shapes, gpt2_init,
              # x, ln1, qkv (3d), atty, x2, ln2, fch (4d), gelu (4d); the MLP's backward holds three (N, 4d)
              kept=lambda cfg: 16 * cfg.emb_dim, scratch=lambda cfg: 12 * cfg.emb_dim)
LLAMA = Family("llama", "embed_tokens.weight", None, "layers.{}.",
               Stage("lnf", "rmsnorm", ("x",), "norm", tensors=("weight",), forward="lnf = rmsnorm(x; norm)",
                     backward="dx, dw = rmsnorm_backward(dlnf)"),
               llama.stages, llama.param_shapes, llama.init_params,
               # x, ln1, x2, ln2 (d each), qkvr (W; Qwen3 also qkv), atty (H hd), gu (2f), act (f); the MLP's
               # backward holds dact, dgu and the (N, 2f) product terms
               kept=lambda cfg: 4 * cfg.emb_dim + cfg.qkv_dim * (1 + cfg.qk_norm) + cfg.n_heads * cfg.head_dim
               + 3 * cfg.ffn_dim, scratch=lambda cfg: 5 * cfg.ffn_dim + cfg.qkv_dim)


def family_of(cfg) -> Family:
    return GPT2 if isinstance(cfg, GPTConfig) else LLAMA


def param_shapes(cfg) -> dict:
    """Parameter name -> shape for a model of either family."""
    return family_of(cfg).shapes(cfg)


def config_to_dict(cfg) -> dict:
    """A config as JSON-ready fields, with its family named (a GPT-2 config's stays unnamed: the files
    written before there was a second family read back as GPT-2)."""
    d = cfg.to_dict()
    return d if isinstance(cfg, GPTConfig) else {"family": family_of(cfg).name, **d}


def config_from_dict(d: dict):
    """config_to_dict's inverse. Raises ValueError (or TypeError) for fields its family does not have."""
    if not isinstance(d, dict):
        raise ValueError(f"a model config must be a JSON object, got {type(d).__name__}")
    family = d.get("family", "gpt2")
    if family not in ("gpt2", "llama"):
        raise ValueError(f"unknown model family {family!r}")
    fields = {k: v for k, v in d.items() if k != "family"}
    return GPTConfig.from_dict(fields) if family == "gpt2" else llama.LlamaConfig.from_dict(fields)

