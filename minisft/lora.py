"""LoRA: low-rank adapters beside frozen base weights (Hu et al. 2021; Hugging Face PEFT's conventions),
for GPT-2 and the Llama family.

For each targeted linear with Conv1D weight W (in, out), the model computes

    y = x W + b + scale · dropout(x) A B        A (in, r), B (r, out), scale = alpha / r (rsLoRA: alpha / sqrt(r))

and trains only A and B: every base weight is frozen, so its dW matmul, gradient buffer and AdamW
moments never exist. A starts Kaiming-uniform as PEFT draws it (bound 1/sqrt(in)), B at zero, so step
0 is the base model exactly. The fused c_attn (N, 3d) = [q | k | v] takes one adapter for the whole
matrix (`c_attn`) or one per part (`c_attn.q`, `c_attn.k`, `c_attn.v`: the LoRA paper's q and v);
each part updates only its column slice. The Llama family takes PEFT's names (q_proj, k_proj, v_proj,
o_proj, gate_proj, up_proj, down_proj): Hugging Face keeps each as its own nn.Linear, minisft's q/k/v
and gate/up as column slices of the fused qkv_proj / gate_up_proj, so each is a part as c_attn.q is.
A Scheme per family (SCHEMES) holds these names and where each adapts. `lm_head` adapts the output
head (V, d); its up-projection runs inside the fused head + cross-entropy (backend head_loss), so no
(N, V) matrix appears.

The adapters live in `model.params` under `<adapter>.lora_A / .lora_B` (h.0.attn.c_attn[.q|.k|.v],
layers.0.self_attn.q_proj, lm_head) and train through the
ordinary AdamW and gradient clipping; the forward and backward are the backend kernels
`lora_forward` / `lora_backward` (and `lora_down_*` for the head), called by the block's linear op
(minisft/model.py) through `model.lora`.

Files: `save_adapter` writes PEFT's layout (adapter_config.json + adapter_model.safetensors, PEFT
tensor names, lora_A.weight (r, in), lora_B.weight (out, r), fan_in_fan_out true for GPT-2's Conv1D,
false for the Llama family's nn.Linear) plus minisft_adapter.json, the base model's path and checksum.
Per-part c_attn adapters are written as one PEFT adapter of rank k·r whose B is block-structured
(exact, with rank_pattern/alpha_pattern keeping the scale); a Llama part is a PEFT module of its own.
`load_adapter` reads ours and PEFT's. `merge` folds the adapters into the weights.
Training checkpoints (`save_checkpoint`) hold the adapters and their AdamW state only.
"""
import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple

import h5py
import numpy as np

from . import __version__, llama, safetensors
from .checkpoint import (SHAPE_FIELDS, atomic_h5, check_layout, json_default, read_array, read_json, rng_from_state,
                         rng_state, write_arrays)
from .config import GPTConfig
from .errors import MinisftError
from .family import config_from_dict, config_to_dict, family_of
from .files import write_json
from .model import GPT, param_shapes
from .pretrained import HF_REPOS
from .settings import architecture

MODULES = ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "lm_head")   # every linear layer of GPT-2
PARTS = {"c_attn.q": 0, "c_attn.k": 1, "c_attn.v": 2}                  # column block of the fused qkv
TARGETS = MODULES[:1] + tuple(PARTS) + MODULES[1:]
DEFAULT_TARGETS = ("c_attn",)                                          # PEFT's default for GPT-2
PRESETS = {  # the book's exercise 7.4 with appendix E's LoRA: rank 16, alpha 16, every linear layer
    "book-7.4": dict(lora_rank=16, lora_alpha=16.0, lora_targets="all"),
}
CONFIG_FILE, WEIGHTS_FILE, MINISFT_FILE = "adapter_config.json", "adapter_model.safetensors", "minisft_adapter.json"
PEFT_PREFIX = "base_model.model."
CKPT_FORMAT, CKPT_VERSION = "minisft-lora-checkpoint", 1


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple = DEFAULT_TARGETS
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclass(frozen=True)
class Part:
    """One adapter: A (n_in, r) and B (r, n_out) updating columns [col, col + n_out) of module's output."""
    prefix: str      # parameter names are prefix + ".lora_A" / ".lora_B"
    module: str      # h.{i}.attn.c_attn ... or lm_head
    col: int
    n_in: int
    n_out: int
    rank: int
    scale: float

    @property
    def a(self) -> str:
        return self.prefix + ".lora_A"

    @property
    def b(self) -> str:
        return self.prefix + ".lora_B"


class Slot(NamedTuple):
    """Where a target adapts within one block: columns [col, col + n_out) of module's output."""
    name: str        # the adapter's name in the block: attn.c_attn.q, self_attn.q_proj
    module: str      # the block's linear it updates: attn.c_attn, self_attn.qkv_proj
    col: int
    n_in: int
    n_out: int


def _gpt2_slots(cfg) -> dict:
    """GPT-2's targets -> Slot: each module whole, and c_attn's q, k, v column blocks."""
    d = cfg.emb_dim
    slots = {t: Slot(m, m, 0, n_in, n_out) for t, m, n_in, n_out in (
        ("c_attn", "attn.c_attn", d, 3 * d), ("attn.c_proj", "attn.c_proj", d, d), ("c_fc", "mlp.c_fc", d, 4 * d),
        ("mlp.c_proj", "mlp.c_proj", 4 * d, d))}
    return slots | {t: Slot(f"attn.c_attn.{t[-1]}", "attn.c_attn", k * d, d, d) for t, k in PARTS.items()}


def _llama_slots(cfg) -> dict:
    """The Llama family's targets -> Slot, from its Hugging Face layout (llama.hf_layout): each HF
    nn.Linear of block 0 is a target named as PEFT names it, at its columns of minisft's tensor."""
    shapes, block, slots = llama.param_shapes(cfg), "model.layers.0.", {}
    for hf, piece in llama.hf_layout(cfg).items():
        if piece.linear and hf.startswith(block) and hf.endswith(".weight"):
            name = hf[len(block):-len(".weight")]                                       # self_attn.q_proj
            n_in, width = shapes[piece.ours]                                            # (in, out) fused
            module = piece.ours[len("layers.0."):-len(".weight")]                       # self_attn.qkv_proj
            slots[name.rsplit(".", 1)[1]] = Slot(name, module, piece.start, n_in, (piece.stop or width) - piece.start)
    return slots


@dataclass(frozen=True)
class Scheme:
    """One family's LoRA targets: their names, where each adapts, and how PEFT names them."""
    label: str          # the family, in messages
    every: tuple        # `all`: one target per Hugging Face linear (a PEFT module each), the head last
    names: tuple        # every target accepted: `every` and the column parts of a fused module
    default: tuple      # PEFT's default targets for the family
    fused: dict         # a whole fused module -> its parts: a run names one or the other
    body: str           # PEFT's prefix of the body's modules (base_model.model.<body>h.0.attn.c_attn)
    conv1d: bool        # Hugging Face's weights are Conv1D (in, out): PEFT's fan_in_fan_out
    shape_fields: tuple  # the base config fields minisft_adapter.json records
    slots: Callable     # cfg -> {target: Slot} (lm_head aside)


LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
SCHEMES = {
    "gpt2": Scheme("GPT-2", MODULES, TARGETS, DEFAULT_TARGETS, {"c_attn": tuple(PARTS)}, "transformer.", True,
                   SHAPE_FIELDS, _gpt2_slots),
    "llama": Scheme("Llama-family", LLAMA_TARGETS, LLAMA_TARGETS, ("q_proj", "v_proj"), {}, "model.", False,
                    SHAPE_FIELDS + ("n_kv_heads", "head_dim", "ffn_dim"), _llama_slots),
}


def scheme_of(cfg) -> Scheme:
    return SCHEMES[family_of(cfg).name]


def head_slot(cfg) -> Slot:
    """The output head's adapter (both families): the head (V, d) as a linear d -> V."""
    return Slot("lm_head", "lm_head", 0, cfg.emb_dim, cfg.vocab_size)


def _in_block(name: str) -> tuple[int, str]:
    """'layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj'): every family names block i's tensors
    <word>.<i>.<name in the block> (Family.layer)."""
    _, i, rest = name.split(".", 2)
    return int(i), rest


def _peft_target(scheme: Scheme, slots: dict, module: str, col: int) -> str:
    """The `every` target (one PEFT module) holding column col of the block's module."""
    return next(t for t in scheme.every[:-1] if slots[t].module == module
                and slots[t].col <= col < slots[t].col + slots[t].n_out)


# ---- settings ---------------------------------------------------------------------------------------
def parse_targets(text: str, scheme: Scheme = SCHEMES["gpt2"], setting="lora-targets") -> tuple:
    """'c_attn.q,c_attn.v' -> ('c_attn.q', 'c_attn.v'); 'all' -> every linear layer incl. the head."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if names == ("all",):
        return scheme.every
    check_targets(names or (text,), scheme, setting)  # naming nothing: refused as the text given
    return tuple(dict.fromkeys(names))


def check_targets(names: tuple, scheme: Scheme, setting="lora-targets") -> None:
    """Refuse a target the family lacks, or a fused module named with its parts."""
    unknown = [t for t in names if t not in scheme.names]
    if unknown:
        raise MinisftError(f"setting {setting}: unknown target {unknown[0]!r} for a {scheme.label} model; choose "
                           f"from {', '.join(scheme.names)} or all")
    for whole, parts in scheme.fused.items():
        if whole in names and any(t in parts for t in names):
            raise MinisftError(f"setting {setting}: {whole} adapts the whole fused matrix; name it or its parts "
                               f"{', '.join(parts)}, not both")


def check_settings(s):
    """Settings with LoRA resolved: a preset fills what the flags left unset; bad values refused by name."""
    fields = ("lora_alpha", "lora_targets", "lora_dropout", "lora_rslora")
    if s.lora_preset is not None:
        if s.lora_preset not in PRESETS:
            raise MinisftError(f"setting lora-preset: unknown preset {s.lora_preset!r}; choose one of "
                               f"{', '.join(PRESETS)}")
        s = replace(s, **{k: v for k, v in PRESETS[s.lora_preset].items() if getattr(s, k) is None})
    if s.lora_rank is None:
        given = [f for f in fields if getattr(s, f) not in (None, False)]
        if given:
            raise MinisftError(f"setting {given[0].replace('_', '-')}: needs --lora-rank or --lora-preset")
        return s
    if s.lora_dropout is not None and not 0.0 <= s.lora_dropout < 1.0:
        raise MinisftError(f"setting lora-dropout: must be in [0, 1), got {s.lora_dropout}")
    if s.lora_alpha is not None and s.lora_alpha <= 0:
        raise MinisftError(f"setting lora-alpha: must be positive, got {s.lora_alpha}")
    lora_config(s)  # targets and rank against the layers' shapes
    if s.init == "random":  # refused rather than saving the base: a full copy of the model in every run folder
        raise MinisftError("setting init: a LoRA run needs pretrained base weights (a preset or --weights): "
                           "adapters trained on a random init are useless without that base, which is never saved")
    return s


def lora_config(s) -> LoraConfig:
    """The LoraConfig of validated Settings (alpha defaults to the rank: scale 1; targets to the
    family's PEFT default)."""
    cfg = architecture(s)
    scheme = scheme_of(cfg)
    lc = LoraConfig(rank=s.lora_rank, alpha=float(s.lora_alpha if s.lora_alpha is not None else s.lora_rank),
                    dropout=s.lora_dropout or 0.0, rslora=bool(s.lora_rslora),
                    targets=parse_targets(s.lora_targets, scheme) if s.lora_targets else scheme.default)
    plan(cfg, lc)
    return lc


def plan(cfg, lc: LoraConfig) -> list:
    """Every Part the targets name, in layer order; rank checked against each layer (setting lora-rank)."""
    scheme, fam = scheme_of(cfg), family_of(cfg)
    check_targets(lc.targets, scheme)
    slots = scheme.slots(cfg)
    layers = []  # Slots named in the model (h.3.attn.c_attn.q)
    for i in range(cfg.n_layers):
        h = fam.layer.format(i)
        layers += [slots[t]._replace(name=h + slots[t].name, module=h + slots[t].module)
                   for t in lc.targets if t != "lm_head"]
    if "lm_head" in lc.targets:
        layers.append(head_slot(cfg))
    for prefix, _, _, n_in, n_out in layers:
        if not 1 <= lc.rank <= min(n_in, n_out):
            raise MinisftError(f"setting lora-rank: {lc.rank} must lie in [1, {min(n_in, n_out)}] for "
                               f"{prefix} ({n_in} x {n_out})")
    return [Part(*layer, lc.rank, lc.scale) for layer in layers]


# ---- the adapters in the model ---------------------------------------------------------------------------
class Lora:
    """The adapters attached to one GPT: which modules they change, and their forward and backward."""

    def __init__(self, config: LoraConfig | None, parts: list, base: dict):
        self.config = config                  # None for an adapter read from a file (per-module ranks)
        self.parts = parts
        self.base = base                      # {"path": ..., "sha256": ...} of the frozen weights
        self.by_module = {}
        for p in parts:
            self.by_module.setdefault(p.module, []).append(p)
        self.head = self.by_module.pop("lm_head", [None])[0]

    def _drop(self, model, x, train):
        p = self.config.dropout if self.config else 0.0
        return model.B.dropout_forward(x, p, model.rng) if train and p > 0 else (x, None)

    def forward(self, model, module, x, y, acts, train) -> None:
        """y (N, out) += every adapter of module on x (N, in), in place; acts keeps the backward's inputs."""
        parts = self.by_module.get(module)
        if not parts:
            return
        B, P = model.B, model.params
        xd, mask = self._drop(model, x, train)                                          # (N, in)
        us = [B.lora_forward(y, xd, P[p.a], P[p.b], p.scale, p.col) for p in parts]     # (N, r) each
        acts["lora." + module] = (xd, mask, us)

    def backward(self, model, module, dy, acts, dx) -> None:
        """dy (N, out) -> the adapters' gradients into model.grads, their input gradient added into dx (N, in)."""
        parts = self.by_module.get(module)
        if not parts:
            return
        B, P = model.B, model.params
        xd, mask, us = acts["lora." + module]
        dxd = None
        for p, u in zip(parts, us):
            dxp, da, db = B.lora_backward(dy, xd, u, P[p.a], P[p.b], p.scale, p.col)   # (N, in)
            model.accumulate(p.a, da)
            model.accumulate(p.b, db)
            dxd = dxp if dxd is None else B.residual_forward(dxd, dxp)  # parts share x: their dx add
        if mask is not None:
            dxd = B.dropout_backward(dxd, mask)
        B.add_(dx, dxd)

    def head_forward(self, model, lnf, cache):
        """The head adapter's (u, b, du, db) for head_loss (None without one). cache None: evaluation,
        no dropout and no gradient buffers; else the backward's inputs are kept in it."""
        p = self.head
        if p is None:
            return None
        B, P = model.B, model.params
        xd, mask = self._drop(model, lnf, cache is not None)                            # (N, d)
        u = B.lora_down_forward(xd, P[p.a], p.scale)                                     # (N, r)
        if cache is None:
            return u, P[p.b], None, None
        lora = (u, P[p.b], B.zeros_like(u), B.zeros_like(P[p.b]))
        cache["lora.head"] = (xd, mask, lora)
        return lora

    def head_backward(self, model, cache, dlnf) -> None:
        p = self.head
        if p is None:
            return
        B = model.B
        xd, mask, (_, _, du, db) = cache["lora.head"]
        model.accumulate(p.b, db)
        dx, da = B.lora_down_backward(du, xd, model.params[p.a], p.scale)               # (N, d)
        model.accumulate(p.a, da)
        if mask is not None:
            dx = B.dropout_backward(dx, mask)
        B.add_(dlnf, dx)

    def head_logits_(self, model, lnf, logits) -> None:
        """Inference: logits (N, V) += the head adapter's update, in place."""
        if self.head is not None:
            p = self.head
            model.B.lora_forward(logits, lnf, model.params[p.a], model.params[p.b], p.scale)


def base_checksum(model: GPT) -> str:
    """sha256 of the base weights as float32, in param_shapes order: the adapter's base, by content."""
    h = hashlib.sha256()
    for name in param_shapes(model.cfg):
        h.update(name.encode())
        h.update(np.ascontiguousarray(model.B.to_numpy(model.params[name]), dtype="<f4").tobytes())
    return h.hexdigest()


def _attach(model: GPT, config, parts, arrays: dict, base_path) -> Lora:
    base = {"path": str(base_path) if base_path is not None else None, "sha256": base_checksum(model)}
    for name, a in arrays.items():
        model.params[name] = model.B.from_numpy(a)
    model.frozen = set(param_shapes(model.cfg))  # every base weight: no dW, no gradient, no moments
    model.lora = Lora(config, parts, base)
    model.grads = {}
    return model.lora


def attach(model: GPT, config: LoraConfig, seed: int = 0, base_path=None) -> Lora:
    """Fresh adapters on model (PEFT's init: A Kaiming-uniform, B zero), base weights frozen."""
    if model.lora is not None:
        raise ValueError("the model already has LoRA adapters")
    parts = plan(model.cfg, config)
    rng = np.random.default_rng(seed)
    arrays = {}
    for p in parts:
        # kaiming_uniform_(a=sqrt(5)) on PEFT's (r, in) lora_A: bound = sqrt(6 / ((1 + 5) fan_in)) = 1/sqrt(in)
        bound = 1.0 / math.sqrt(p.n_in)
        arrays[p.a] = rng.uniform(-bound, bound, size=(p.n_in, p.rank))                 # (in, r)
        arrays[p.b] = np.zeros((p.rank, p.n_out))                                        # (r, out)
    return _attach(model, config, parts, arrays, base_path)


def count_parameters(model: GPT) -> tuple[int, int]:
    """(trainable, all) parameters, adapters included in all (as PEFT counts)."""
    sizes = {n: math.prod(p.shape) for n, p in model.params.items()}
    return sum(s for n, s in sizes.items() if n not in model.frozen), sum(sizes.values())


def trainable_parameters(model: GPT) -> str:
    """PEFT's print_trainable_parameters line."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


# ---- merging ---------------------------------------------------------------------------------------------
def merged_state_dict(model: GPT) -> tuple[GPTConfig | llama.LlamaConfig, dict]:
    """-> (config, {parameter name: float32 array}) with every adapter folded in: W[:, cols] += scale A B.
    A head adapter on a tied head unties it (lm_head = the embedding + delta), so the embeddings stay
    the base's."""
    lora, cfg = model.lora, model.cfg
    sd = {n: model.B.to_numpy(model.params[n]).astype(np.float32) for n in param_shapes(cfg)}
    for p in lora.parts:
        a = model.B.to_numpy(model.params[p.a]).astype(np.float64)                      # (in, r)
        b = model.B.to_numpy(model.params[p.b]).astype(np.float64)                      # (r, out)
        delta = p.scale * (a @ b)                                                       # (in, out)
        if p.module == "lm_head":
            if cfg.tie_embeddings:
                cfg = replace(cfg, tie_embeddings=False)
                sd["lm_head.weight"] = sd[model.family.embed].copy()
            sd["lm_head.weight"] += delta.T.astype(np.float32)                          # (V, d)
        else:
            sd[p.module + ".weight"][:, p.col:p.col + p.n_out] += delta.astype(np.float32)
    return cfg, sd


def merge(model: GPT) -> GPT:
    """A plain GPT (no adapters) on the same backend whose weights hold the merged adapters."""
    cfg, sd = merged_state_dict(model)
    return GPT(cfg, backend=model.B, dtype=model.dtype, params=sd)


# ---- PEFT files ------------------------------------------------------------------------------------------
def _peft_module(scheme: Scheme, module: str) -> str:
    return PEFT_PREFIX + ("lm_head" if module == "lm_head" else scheme.body + module)


def peft_groups(model: GPT) -> dict:
    """{PEFT module, in minisft's names: (its width, [(part, its first column in the module)])}, in the
    parts' order. A GPT-2 PEFT module is a whole Conv1D (c_attn's parts share it), a Llama-family one
    an HF nn.Linear (one part each)."""
    scheme, fam = scheme_of(model.cfg), family_of(model.cfg)
    slots = scheme.slots(model.cfg)
    groups: dict = {}
    for p in model.lora.parts:
        if p.module == "lm_head":
            name, col, width = "lm_head", 0, p.n_out
        else:
            i, module = _in_block(p.module)
            sl = slots[_peft_target(scheme, slots, module, p.col)]
            name, col, width = fam.layer.format(i) + sl.name, p.col - sl.col, sl.n_out
        groups.setdefault(name, (width, []))[1].append((p, col))
    return groups


def peft_tensors(model: GPT) -> tuple[dict, dict]:
    """-> ({PEFT tensor name: array}, {PEFT module (peft_groups): (rank, n_parts)}). A module's parts stack into one
    PEFT adapter: lora_A rows [A_q^T; A_v^T], lora_B columns holding each B^T in its column block."""
    tensors, ranks = {}, {}
    scheme = scheme_of(model.cfg)
    for module, (n_out, parts) in peft_groups(model).items():
        r = sum(p.rank for p, _ in parts)
        a_peft = np.zeros((r, parts[0][0].n_in), np.float32)                            # (k r, in)
        b_peft = np.zeros((n_out, r), np.float32)                                       # (out, k r)
        j = 0
        for p, col in parts:
            a_peft[j:j + p.rank] = model.B.to_numpy(model.params[p.a]).T
            b_peft[col:col + p.n_out, j:j + p.rank] = model.B.to_numpy(model.params[p.b]).T
            j += p.rank
        tensors[_peft_module(scheme, module) + ".lora_A.weight"] = a_peft
        tensors[_peft_module(scheme, module) + ".lora_B.weight"] = b_peft
        ranks[module] = (r, len(parts))
    return tensors, ranks


def save_adapter(model: GPT, out_dir) -> Path:
    """Write the adapters in PEFT's layout (+ minisft_adapter.json: the base's path and checksum)."""
    lora = model.lora
    if lora is None or lora.config is None:
        raise ValueError("save_adapter needs a model with adapters attached by attach()")
    lc = lora.config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, ranks = peft_tensors(model)
    # PEFT scales by alpha / r per module: a module holding k parts has rank k r, and keeps each
    # part's scale with alpha k r / r (rsLoRA: alpha sqrt(k r / r)).
    rank_pattern, alpha_pattern = {}, {}
    for module, (r, k) in ranks.items():
        if k > 1:
            key = module.split(".", 2)[2]                                               # attn.c_attn
            rank_pattern[key] = r
            alpha_pattern[key] = lc.alpha * (math.sqrt(k) if lc.rslora else k)
    scheme = scheme_of(model.cfg)
    slots = scheme.slots(model.cfg)
    targets = sorted({t if t == "lm_head" else _peft_target(scheme, slots, slots[t].module, slots[t].col)
                      for t in lc.targets})                                         # c_attn.q -> c_attn
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": lora.base["path"],
        "r": lc.rank, "lora_alpha": lc.alpha, "lora_dropout": lc.dropout, "use_rslora": lc.rslora,
        "target_modules": targets, "fan_in_fan_out": scheme.conv1d, "bias": "none", "modules_to_save": None,
        "init_lora_weights": True, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "inference_mode": True, "use_dora": False,
    }
    safetensors.save(out / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    write_json(out / CONFIG_FILE, config, indent=2)
    write_json(out / MINISFT_FILE, {"minisft_version": __version__, "lora": _config_dict(lc), "base": lora.base,
                                    "base_config": {k: getattr(model.cfg, k) for k in scheme.shape_fields}}, indent=2)
    return out


def _config_dict(lc: LoraConfig) -> dict:
    return {**asdict(lc), "targets": list(lc.targets)}


def _peft_names(scheme: Scheme, cfg) -> re.Pattern:
    """PEFT's adapter tensor names for a model of cfg -> (its module in minisft's names, A or B)."""
    slots = scheme.slots(cfg)
    layer = re.escape(family_of(cfg).layer).replace(re.escape("{}"), r"\d+")          # h\.\d+\.
    modules = "|".join(re.escape(slots[t].name) for t in scheme.every[:-1])
    return re.compile(rf"{re.escape(PEFT_PREFIX)}(?:{re.escape(scheme.body)})?({layer}(?:{modules})|lm_head)"
                      r"\.lora_([AB])\.weight")


def load_adapter(model: GPT, adapter_dir) -> Lora:
    """Attach an adapter folder in PEFT's layout (written by minisft or by PEFT, for the model's family)
    to model, for inference or merging. Everything is checked before the model changes."""
    scheme = scheme_of(model.cfg)
    d = Path(adapter_dir)
    cfg_path, w_path = d / CONFIG_FILE, d / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise MinisftError(f"{d}: not a LoRA adapter folder: {p.name} is missing")
    try:
        conf = json.loads(cfg_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise MinisftError(f"{cfg_path}: not valid JSON: {e}") from None
    if conf.get("peft_type") != "LORA":
        raise MinisftError(f"{cfg_path}: peft_type {conf.get('peft_type')!r} is not LORA")
    for key, ok in (("bias", ("none", None)), ("modules_to_save", (None, [])), ("use_dora", (False, None))):
        if conf.get(key) not in ok:
            raise MinisftError(f"{cfg_path}: {key} = {conf.get(key)!r} is not supported (minisft loads plain "
                               f"LoRA adapters: bias none, no modules_to_save, no DoRA)")
    try:
        r0, alpha0, rslora = int(conf["r"]), float(conf["lora_alpha"]), bool(conf.get("use_rslora", False))
    except (KeyError, TypeError, ValueError) as e:
        raise MinisftError(f"{cfg_path}: field r / lora_alpha missing or not a number ({e})") from None
    base_sha = None
    if (d / MINISFT_FILE).is_file():
        ours = json.loads((d / MINISFT_FILE).read_text(encoding="utf-8"))
        differ = [f"{k} {v} vs {getattr(model.cfg, k)}" for k, v in ours.get("base_config", {}).items()
                  if getattr(model.cfg, k, v) != v]
        if differ:
            raise MinisftError(f"{d / MINISFT_FILE}: the adapter's base model does not match: {', '.join(differ)}")
        base_sha = ours.get("base", {}).get("sha256")
    tensors, _ = safetensors.load(w_path)
    found, names = {}, _peft_names(scheme, model.cfg)
    for name, a in tensors.items():
        if name == PEFT_PREFIX + "lm_head.base_layer.weight":
            # PEFT saves the output head's own weight beside its adapter (save_embedding_layers): it
            # must be the base's, or the adapter belongs to another model.
            head = model.params[model.head_name]
            if a.shape != tuple(head.shape) or not np.array_equal(a, model.B.to_numpy(head).astype(np.float32)):
                raise MinisftError(f"{w_path}: {name} differs from this base model's output head")
            continue
        m = names.fullmatch(name)
        if m is None:
            raise MinisftError(f"{w_path}: tensor {name!r} is not a LoRA weight of a {scheme.label} linear layer")
        found.setdefault(m.group(1), {})[m.group(2)] = np.asarray(a, np.float32)
    if not found:
        raise MinisftError(f"{w_path}: holds no LoRA tensors")
    slots = {sl.name: sl for sl in scheme.slots(model.cfg).values()}
    parts, arrays = [], {}
    for module, ab in found.items():
        if set(ab) != {"A", "B"}:
            raise MinisftError(f"{w_path}: {module} has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        if module == "lm_head":
            sl, h = head_slot(model.cfg), ""
        else:
            i, name = _in_block(module)
            if i >= model.cfg.n_layers:
                raise MinisftError(f"{w_path}: {module}: the base model has only {model.cfg.n_layers} layers")
            sl, h = slots[name], family_of(model.cfg).layer.format(i)
        n_in, n_out = sl.n_in, sl.n_out
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if a.shape != (r, n_in) or b.shape != (n_out, r):
            raise MinisftError(f"{w_path}: {module} lora_A {a.shape} / lora_B {b.shape} do not fit the base "
                               f"layer ({n_in} x {n_out}): the adapter was trained on another model")
        key = module if module == "lm_head" else module.split(".", 2)[2]
        rank = _pattern(conf.get("rank_pattern"), module, key, r0)
        alpha = _pattern(conf.get("alpha_pattern"), module, key, alpha0)
        if rank != r:
            raise MinisftError(f"{cfg_path}: {module} has rank {r} in the weights, {rank} in the config")
        scale = alpha / (math.sqrt(r) if rslora else r)
        part = Part(h + sl.name, h + sl.module, sl.col, n_in, n_out, r, scale)
        parts.append(part)
        arrays[part.a], arrays[part.b] = a.T, b.T                                       # (in, r), (r, out)
    if model.lora is not None:
        raise MinisftError("the model already has LoRA adapters")
    lora = _attach(model, None, parts, arrays, conf.get("base_model_name_or_path"))
    if base_sha is not None and base_sha != lora.base["sha256"]:
        _detach(model)
        raise MinisftError(f"{d / MINISFT_FILE}: the adapter was trained on other base weights (sha256 "
                           f"{base_sha[:12]}..., these are {lora.base['sha256'][:12]}...)")
    return lora


def _pattern(pattern, module, key, default):
    """PEFT's rank_pattern / alpha_pattern: a key matching the module's name (as PEFT matches) wins."""
    for k, v in (pattern or {}).items():
        if re.match(rf"(.*\.)?({k})$", module) or k == key:
            return float(v) if isinstance(default, float) else int(v)
    return default


def _detach(model: GPT) -> None:
    for p in model.lora.parts:
        del model.params[p.a], model.params[p.b]
    model.lora, model.frozen, model.grads = None, set(), {}


# ---- training checkpoints: adapters and their AdamW state only -------------------------------------------
def save_checkpoint(path, model: GPT, optimizer, train_state: dict | None = None) -> Path:
    """Like minisft.checkpoint.save_checkpoint, for a LoRA run: the base weights are referenced by path
    and sha256, not copied; the adapters and their AdamW moments are stored bit-for-bit."""
    path = Path(path)
    lora = model.lora
    names = [n for p in lora.parts for n in (p.a, p.b)]
    with atomic_h5(path) as f:
        f.attrs.update(format=CKPT_FORMAT, format_version=CKPT_VERSION, minisft_version=__version__,
                       dtype=model.dtype)
        f["config"] = json.dumps(config_to_dict(model.cfg))
        f["lora"] = json.dumps({"config": _config_dict(lora.config), "base": lora.base})
        f.create_group("model").attrs["rng"] = json.dumps(rng_state(model.rng))
        write_arrays(f.create_group("params"), {n: model.params[n] for n in names}, model)
        f.attrs["array_dtype"] = f["params"][names[0]].dtype.str
        g = f.create_group("adam")
        g.attrs.update(step=optimizer.step_count)
        write_arrays(g.create_group("m"), optimizer.m, model)
        write_arrays(g.create_group("v"), optimizer.v, model)
        f["train_state"] = json.dumps(train_state or {}, default=json_default, allow_nan=True)
    return path


def is_checkpoint(path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return f.attrs.get("format") == CKPT_FORMAT
    except OSError:
        return False


def read_checkpoint_header(path) -> tuple[GPTConfig | llama.LlamaConfig, LoraConfig, dict]:
    """-> (model config, LoraConfig, base {path, sha256}) of a LoRA checkpoint, without loading arrays."""
    with h5py.File(path, "r") as f:
        meta = read_json(f, path, "lora")
        cfg = config_from_dict(read_json(f, path, "config"))
    c = meta["config"]
    return cfg, LoraConfig(**{**c, "targets": tuple(c["targets"])}), meta["base"]


def load_checkpoint(path, model: GPT, optimizer=None) -> dict:
    """Restore adapters (+ AdamW moments and step) from a LoRA checkpoint into model, whose base
    weights must be the ones it was trained on (same sha256) and whose adapters the same config.
    Returns the train_state. Everything is checked before anything is loaded."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise MinisftError(f"{path}: cannot be read as an HDF5 checkpoint ({e})") from None
    with f:
        if f.attrs.get("format") != CKPT_FORMAT or f.attrs.get("format_version") != CKPT_VERSION:
            raise MinisftError(f"{path}: not a minisft LoRA checkpoint of format version {CKPT_VERSION}")
        if not f.attrs.get("complete", False):
            raise MinisftError(f"{path}: incomplete checkpoint (the completion marker is missing)")
        meta = read_json(f, path, "lora")
        lora = model.lora
        if lora is None or meta["config"] != _config_dict(lora.config):
            raise MinisftError(f"{path}: its LoRA settings {meta['config']} differ from this run's "
                               f"{_config_dict(lora.config) if lora else 'none'}")
        if meta["base"]["sha256"] != lora.base["sha256"]:
            raise MinisftError(f"{path}: the adapters were trained on other base weights ({meta['base']['path']}, "
                               f"sha256 {meta['base']['sha256'][:12]}...), not on {lora.base['path']} (sha256 "
                               f"{lora.base['sha256'][:12]}...)")
        shapes = {n: tuple(model.params[n].shape) for p in lora.parts for n in (p.a, p.b)}
        dtype = np.dtype(f.attrs["array_dtype"])
        for group in ("params", "adam/m", "adam/v"):
            check_layout(f, path, group, {n: (shape, dtype) for n, shape in shapes.items()})
        train_state = read_json(f, path, "train_state")
        rng = rng_from_state(json.loads(f["model"].attrs["rng"]))
        for n in shapes:
            model.params[n] = model.B.from_numpy(read_array(f, path, f"params/{n}"))
        model.rng, model.grads = rng, {}
        if optimizer is not None:
            for key in ("m", "v"):  # LoRA runs keep fp32 moments
                optimizer.moments[key] = {n: model.B.from_numpy(read_array(f, path, f"adam/{key}/{n}")) for n in shapes}
            optimizer.step_count = int(f["adam"].attrs["step"])
    return train_state


def model_from_checkpoint(path, backend="numpy", dtype=None, device=None, weights=None, cache_dir=None) -> GPT:
    """A LoRA checkpoint -> its base model (weights: the base's path, checked against the recorded
    sha256; default the path the checkpoint records) with the checkpoint's adapters attached, for
    inference or export."""
    cfg, lc, base = read_checkpoint_header(path)
    source = weights or recorded_base(path, base["path"])
    model = GPT.from_pretrained(source, backend=backend, dtype=dtype or "float32", cache_dir=cache_dir,
                                device=device, model=cfg)
    attach(model, lc, base_path=source)
    load_checkpoint(path, model)
    return model


def recorded_base(where, source: str | None) -> str:
    """The base weights a LoRA checkpoint or adapter folder records, refused naming that file when
    they are not there (before any loading)."""
    if source is None:
        raise MinisftError(f"{where}: records no base model; pass --weights BASE, the weights it was trained on")
    if source not in HF_REPOS and not Path(source).exists():
        relative = "" if Path(source).is_absolute() else " (a path relative to the folder its training ran in)"
        raise MinisftError(f"{where}: the base weights it records, {source}{relative}, do not exist; pass "
                           "--weights BASE, the weights it was trained on")
    return source


def base_of_adapter(adapter_dir) -> str | None:
    """The base model path an adapter folder records (ours: minisft_adapter.json; PEFT's: its config)."""
    d = Path(adapter_dir)
    for name, key in ((MINISFT_FILE, "base"), (CONFIG_FILE, None)):
        if (d / name).is_file():
            try:
                conf = json.loads((d / name).read_text(encoding="utf-8"))
            except ValueError as e:
                raise MinisftError(f"{d / name}: not valid JSON: {e}") from None
            path = conf.get(key, {}).get("path") if key else conf.get("base_model_name_or_path")
            if path:
                return path
    return None
