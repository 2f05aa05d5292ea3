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


GPT2 = Family("gpt2", "wte.weight", "wpe.weight", "h.{}.",
              Stage("lnf", "layernorm", ("x",), "ln_f", forward="lnf = layernorm(x; ln_f)",
                    backward="dx, dw, db = layernorm_backward(dlnf)"),
              lambda cfg: block.stages(), gpt2_shapes, gpt2_init)
LLAMA = Family("llama", "embed_tokens.weight", None, "layers.{}.",
               Stage("lnf", "rmsnorm", ("x",), "norm", tensors=("weight",), forward="lnf = rmsnorm(x; norm)",
                     backward="dx, dw = rmsnorm_backward(dlnf)"),
               llama.stages, llama.param_shapes, llama.init_params)


def family_of(cfg) -> Family:
    return GPT2 if isinstance(cfg, GPTConfig) else LLAMA


def param_shapes(cfg) -> dict:
    """Parameter name -> shape for a model of either family."""
    return family_of(cfg).shapes(cfg)
