"""OpenAI's GPT-2 weights in, Hugging Face GPT-2 folders out, with neither torch nor TensorFlow.

In: a preset name downloads `config.json` + `model.safetensors` of openai-community/gpt2 (or
-medium, -large, -xl) into a cache folder, resumably; a local path is an HF-style folder or a single
.safetensors file whose shape comes from a preset. The safetensors file is read memory-mapped
(minisft/safetensors.py) and checked tensor by tensor against the shapes the config implies.

Out: `save_pretrained` writes the folder `transformers.GPT2LMHeadModel.from_pretrained` loads,
named exactly as GPT2LMHeadModel's own `save_pretrained` names them: `transformer.`-prefixed body
tensors plus an unprefixed `lm_head.weight` when the head is untied. (Older transformers releases
refuse a file that mixes unprefixed body names with `lm_head.weight`.)
"""
import json
import os
import re
from pathlib import Path

import numpy as np

from . import safetensors
from .download import cache_root, download_file
from .errors import MinisftError
from .files import write_json
from .backends.constants import LN_EPS
from .config import GPTConfig, check_tensors, param_shapes

HF_BASE_URL = "https://huggingface.co"
HF_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
HF_FILES = ("config.json", "model.safetensors")
# The causal-mask buffers real GPT-2 files carry: constants of the attention, not parameters.
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
# HF config fields that change what the network computes, and the values our kernels implement
# (gelu_new and gelu_pytorch_tanh are both GELU's tanh approximation).
FIXED_FIELDS = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (LN_EPS,),
                "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,)}
SHAPE_FIELDS = ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads")


# ---- download ---------------------------------------------------------------------------------------
def fetch_preset(name: str, cache_dir=None, base_url: str | None = None) -> Path:
    """Download a preset's HF files (once) -> the cache folder holding them."""
    base = (base_url or os.environ.get("MINISFT_HF_BASE_URL") or HF_BASE_URL).rstrip("/")
    folder = cache_root(cache_dir) / "models" / name
    for fname in HF_FILES:  # each is downloaded only when not there yet
        download_file(f"{base}/{HF_REPOS[name]}/resolve/main/{fname}", folder / fname)
    return folder


# ---- HF config <-> GPTConfig ------------------------------------------------------------------------
def read_hf_config(path) -> GPTConfig:
    """config.json of a GPT-2 folder -> GPTConfig. The head is tied only where the file says
    "tie_word_embeddings": true; OpenAI's configs do not, so they load untied, the book's model
    (the head starts as a copy of wte). Dropout is not taken from the file: fine-tuning uses 0.0."""
    path = Path(path)
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MinisftError(f"{path}: cannot read the model config: {e}") from None
    if not isinstance(hf, dict):
        raise MinisftError(f"{path}: the model config must be a JSON object")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise MinisftError(f"{path}: model_type is {hf['model_type']!r}, only GPT-2 ('gpt2') is supported")
    for field, values in FIXED_FIELDS.items():
        if field in hf and hf[field] not in values:
            raise MinisftError(f"{path}: {field} is {hf[field]!r}; minisft's GPT-2 computes only "
                               + " or ".join(map(repr, values)))

    def get(*keys):  # the first of keys present (n_positions has the older alias n_ctx)
        for k in keys:
            if k in hf:
                if type(hf[k]) is not int or hf[k] <= 0:
                    raise MinisftError(f"{path}: {k} must be a positive integer, got {hf[k]!r}")
                return hf[k]
        raise MinisftError(f"{path}: the field {keys[0]} is missing")

    d = get("n_embd")
    if hf.get("n_inner") not in (None, 4 * d):
        raise MinisftError(f"{path}: n_inner is {hf['n_inner']!r}; minisft's GPT-2 MLP is 4 * n_embd = {4 * d} wide")
    try:
        return GPTConfig(vocab_size=get("vocab_size"), context_length=get("n_positions", "n_ctx"),
                         emb_dim=d, n_layers=get("n_layer"), n_heads=get("n_head"),
                         tie_embeddings=hf.get("tie_word_embeddings") is True)
    except ValueError as e:
        raise MinisftError(f"{path}: {e}") from None


def hf_config(cfg: GPTConfig) -> dict:
    """GPTConfig -> the config.json of a GPT2LMHeadModel. Dropout goes to the embedding and
    residual dropouts, the two minisft has; it applies no dropout to attention probabilities."""
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": LN_EPS, "initializer_range": 0.02,
        "embd_pdrop": cfg.drop_rate, "resid_pdrop": cfg.drop_rate, "attn_pdrop": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


# ---- weights in ---------------------------------------------------------------------------------------
def read_gpt2_weights(path, cfg: GPTConfig) -> dict:
    """A GPT-2 .safetensors file -> {our HF name: array} for a model of shape cfg, every tensor
    checked: names (with or without `transformer.`; mask buffers skipped), shapes, finite values."""
    tensors, _ = safetensors.load(path)
    sd = {}
    for key, a in tensors.items():
        name = key.removeprefix("transformer.")
        if MASK_BUFFER.fullmatch(name):
            continue
        if name in sd:
            raise MinisftError(f"{path}: tensor {name!r} appears both with and without the 'transformer.' prefix")
        sd[name] = a
    if cfg.tie_embeddings and "lm_head.weight" in sd:
        # A tied head is wte itself: a file's separate head is acceptable only as an exact copy.
        if "wte.weight" in sd and not np.array_equal(sd["lm_head.weight"], sd["wte.weight"]):
            raise MinisftError(f"{path}: the config ties the head to wte but lm_head.weight differs "
                               "from wte.weight")
        del sd["lm_head.weight"]
    if not cfg.tie_embeddings and "lm_head.weight" not in sd and "wte.weight" in sd:
        sd["lm_head.weight"] = np.array(sd["wte.weight"])  # the book's untied head starts as a copy of wte

    shapes = param_shapes(cfg)
    check_tensors(f"{path} (a GPT-2 with {cfg.n_layers} layers, d={cfg.emb_dim}, vocab {cfg.vocab_size}, "
                  f"context {cfg.context_length}{'' if cfg.qkv_bias else ', no qkv bias'})",
                  {n: a.shape for n, a in sd.items()}, shapes)
    for name in shapes:
        bad = np.size(sd[name]) - np.count_nonzero(np.isfinite(sd[name]))
        if bad:
            raise MinisftError(f"{path}: tensor {name!r} holds {bad} non-finite values (NaN or inf)")
    return {n: sd[n] for n in shapes}


def read_pretrained(name_or_path, cache_dir=None, model=None, base_url=None) -> tuple[GPTConfig, dict]:
    """GPT-2 weights -> (config, {HF name: array}). name_or_path: a preset (gpt2-small|medium|large|xl,
    downloaded once into the cache), an HF-style folder (config.json + model.safetensors), or a
    .safetensors file. model: a preset name or GPTConfig giving the shape (required for a bare
    file); with a folder it must agree with config.json, and None takes the folder's. The model's
    own settings (untied head, dropout, qkv bias) come from it."""
    try:
        want = GPTConfig.preset(model) if isinstance(model, str) else model
    except ValueError as e:
        raise MinisftError(str(e)) from None
    source = str(name_or_path)
    if source in HF_REPOS:
        folder = fetch_preset(source, cache_dir, base_url)
    elif Path(source).is_dir():
        folder = Path(source)
    elif Path(source).is_file():
        folder = None
    else:
        raise MinisftError(f"pretrained weights {source!r}: not a preset ({', '.join(HF_REPOS)}) "
                           "and no such file or folder")
    if folder is None:
        weights = Path(source)
        if want is None:
            raise MinisftError(f"{weights}: a bare .safetensors file carries no shape; name the model "
                               f"preset it belongs to (model=/--model, one of {', '.join(HF_REPOS)})")
        cfg = want
    else:
        weights = folder / "model.safetensors"
        for p in (folder / "config.json", weights):
            if not p.is_file():
                raise MinisftError(f"{folder}: not a GPT-2 folder: {p.name} is missing")
        try:
            cfg = read_hf_config(folder / "config.json")
        except MinisftError as e:
            raise (_drop_bad_download(folder, e) if source in HF_REPOS else e) from None
        if want is not None:
            differ = [f"{f} {getattr(cfg, f)} vs {getattr(want, f)}" for f in SHAPE_FIELDS
                      if getattr(cfg, f) != getattr(want, f)]
            if differ:
                raise MinisftError(f"{folder / 'config.json'} does not describe the requested model: "
                                   + ", ".join(differ))
            cfg = want
    try:
        return cfg, read_gpt2_weights(weights, cfg)
    except MinisftError as e:
        raise (_drop_bad_download(folder, e) if source in HF_REPOS else e) from None


def _drop_bad_download(folder: Path, e: MinisftError):
    """A preset's cached files that do not load (the server sent an error page, a cut file): removed,
    so the next run downloads them again instead of failing on the same junk forever."""
    for fname in HF_FILES:
        (folder / fname).unlink(missing_ok=True)
    return MinisftError(f"{e}; the downloaded files were removed from the cache ({folder}), so the next run "
                        "downloads them again")


# ---- weights out ------------------------------------------------------------------------------------
def save_pretrained(model, out_dir) -> Path:
    """Write model as an HF GPT-2 folder (config.json + model.safetensors, float32) that
    GPT2LMHeadModel.from_pretrained loads and `read_pretrained` reads back bit-exact (for a float32
    model). A model without qkv bias is written with zero c_attn biases, which GPT-2 requires and
    which compute the same."""
    if model.lora is not None:
        raise ValueError("save_pretrained: the model carries LoRA adapters; write them with "
                         "minisft.lora.save_adapter, or fold them in first with minisft.lora.merge")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg, d = model.cfg, model.cfg.emb_dim
    shapes, source = {}, {}  # HF name -> shape; HF name -> our parameter (None: a zero c_attn bias)
    for name, p in model.params.items():
        hf = name if name == "lm_head.weight" else "transformer." + name
        shapes[hf], source[hf] = tuple(p.shape), name
        if not cfg.qkv_bias and name.endswith("attn.c_attn.weight"):
            shapes[hf.replace(".weight", ".bias")], source[hf.replace(".weight", ".bias")] = (3 * d,), None

    def array_of(hf):  # one tensor on the host at a time: the zero bias (3d,) or the parameter's copy
        name = source[hf]
        return np.zeros(3 * d, np.float32) if name is None else model.B.to_numpy(model.params[name])
    safetensors.save_streamed(out / "model.safetensors", shapes, array_of, metadata={"format": "pt"})
    write_json(out / "config.json", hf_config(cfg), indent=2)
    return out
