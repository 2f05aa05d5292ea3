"""Pretrained weights in, Hugging Face folders out, with neither torch nor TensorFlow: OpenAI's GPT-2
and the Llama family (Llama 3.2, SmolLM2, Qwen2.5, Qwen3; minisft/llama.py).

In: a preset name downloads its hub files (GPT-2: `config.json` + `model.safetensors` of
openai-community/gpt2 and -medium, -large, -xl; the Llama family: also the tokenizer and generation
config, and the weights as one file or as the shards an index names) into a cache folder, resumably;
a local path is an HF-style folder or a single .safetensors file whose shape comes from a preset.
config.json's model_type decides the family. Safetensors files are read memory-mapped
(minisft/safetensors.py), one at a time, and checked tensor by tensor against the shapes the config
implies, before any tensor's data is read.

Out: `save_pretrained` writes the folder `transformers` loads. GPT-2 is named exactly as
GPT2LMHeadModel's own `save_pretrained` names it: `transformer.`-prefixed body tensors plus an
unprefixed `lm_head.weight` when the head is untied (older transformers releases refuse a file
that mixes unprefixed body names with `lm_head.weight`). The Llama family is written in its Hugging
Face names (`model.`-prefixed, q/k/v and gate/up split back out of minisft's fused tensors).
"""
import json
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import llama, safetensors
from .download import HTTPStatusError, cache_root, download_file
from .errors import MinisftError
from .files import write_json
from .backends.constants import LN_EPS
from .config import PRESETS as GPT2_PRESETS, GPTConfig, few, check_tensors, param_shapes
from .llama import LlamaConfig

HF_BASE_URL = "https://huggingface.co"
HF_REPOS = {
    "gpt2-small": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
HF_FILES = ("config.json", "model.safetensors")


class HubModel(NamedTuple):
    repo: str             # owner/name on the hub
    shape: str            # its llama.PRESETS entry (an instruct model has its base model's shape)
    sharded: bool = False  # the weights are model.safetensors.index.json and the shards it names


# The Llama family's presets on the hub. Every one publishes a single model.safetensors today; a
# sharded repository is marked sharded=True.
LLAMA_HUB = {
    "smollm2-135m": HubModel("HuggingFaceTB/SmolLM2-135M", "smollm2-135m"),
    "smollm2-135m-instruct": HubModel("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m"),
    "smollm2-360m": HubModel("HuggingFaceTB/SmolLM2-360M", "smollm2-360m"),
    "smollm2-360m-instruct": HubModel("HuggingFaceTB/SmolLM2-360M-Instruct", "smollm2-360m"),
    "smollm2-1.7b": HubModel("HuggingFaceTB/SmolLM2-1.7B", "smollm2-1.7b"),
    "smollm2-1.7b-instruct": HubModel("HuggingFaceTB/SmolLM2-1.7B-Instruct", "smollm2-1.7b"),
    "qwen2.5-0.5b": HubModel("Qwen/Qwen2.5-0.5B", "qwen2.5-0.5b"),
    "qwen2.5-0.5b-instruct": HubModel("Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-0.5b"),
    "qwen2.5-1.5b": HubModel("Qwen/Qwen2.5-1.5B", "qwen2.5-1.5b"),
    "qwen2.5-1.5b-instruct": HubModel("Qwen/Qwen2.5-1.5B-Instruct", "qwen2.5-1.5b"),
    "qwen3-0.6b": HubModel("Qwen/Qwen3-0.6B", "qwen3-0.6b"),
    "llama-3.2-1b": HubModel("meta-llama/Llama-3.2-1B", "llama-3.2-1b"),  # gated: needs HF_TOKEN
    "llama-3.2-1b-instruct": HubModel("meta-llama/Llama-3.2-1B-Instruct", "llama-3.2-1b"),
}
LLAMA_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
TOKEN_ENV = "HF_TOKEN"
# A shard is a plain file beside the index: no folders, so an index cannot point outside the model.
SHARD_NAME = re.compile(r"[A-Za-z0-9_.-]+\.safetensors")
# The causal-mask buffers real GPT-2 files carry: constants of the attention, not parameters.
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
# HF config fields that change what the network computes, and the values our kernels implement
# (gelu_new and gelu_pytorch_tanh are both GELU's tanh approximation).
FIXED_FIELDS = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "layer_norm_epsilon": (LN_EPS,),
                "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,)}
SHAPE_FIELDS = ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads")
# What a Llama-family folder must agree on with a requested model: everything it computes. The tie
# is the requested model's own setting (an untied model starts its head as a copy of embed_tokens).
LLAMA_SHAPE_FIELDS = tuple(f.name for f in fields(LlamaConfig) if f.name not in ("tie_embeddings", "drop_rate"))
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
# Every --model name: GPT-2's shapes, the hub's Llama-family models, the family's other shapes (llama-tiny).
PRESETS = (*GPT2_PRESETS, *LLAMA_HUB, *(p for p in llama.PRESETS if p not in LLAMA_HUB))
DOWNLOADS = ", ".join([*HF_REPOS, *LLAMA_HUB])  # the presets with weights to download, for messages


# ---- download ---------------------------------------------------------------------------------------
def fetch_preset(name: str, cache_dir=None, base_url: str | None = None) -> Path:
    """Download a preset's HF files (once each) -> the cache folder holding them. The hub's layout:
    {base}/{repo}/resolve/main/{file}. $HF_TOKEN, when set, is sent as a bearer token (gated models)."""
    base = (base_url or os.environ.get("MINISFT_HF_BASE_URL") or HF_BASE_URL).rstrip("/")
    folder = cache_root(cache_dir) / "models" / name
    if name in HF_REPOS:
        for fname in HF_FILES:  # each is downloaded only when not there yet
            download_file(f"{base}/{HF_REPOS[name]}/resolve/main/{fname}", folder / fname)
        return folder
    hub = LLAMA_HUB[name]
    token = os.environ.get(TOKEN_ENV)
    headers = {"Authorization": f"Bearer {token}"} if token else None

    def get(fname):
        url = f"{base}/{hub.repo}/resolve/main/{fname}"
        try:
            return download_file(url, folder / fname, headers=headers)
        except HTTPStatusError as e:
            if e.status not in (401, 403):
                raise
            raise MinisftError(
                f"{url}: HTTP {e.status}: {hub.repo} is gated; accept its licence at {HF_BASE_URL}/{hub.repo} "
                f"and set {TOKEN_ENV} to an access token of that account"
                + (f" ({TOKEN_ENV} is set, but its account has no access to it yet)" if token else "")) from None

    for fname in LLAMA_FILES:
        get(fname)
    if hub.sharded:
        for shard in read_index(get(INDEX)):
            get(shard)
    else:
        get(WEIGHTS)
    return folder


# ---- HF config <-> GPTConfig / LlamaConfig ---------------------------------------------------------
def read_json(path: Path, what: str) -> dict:
    """A JSON object file -> dict; one line naming the file when it is unreadable, not JSON, not an
    object, or repeats a key (json keeps the last silently: an index listing a tensor twice)."""
    def no_repeats(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) < len(keys):
            twice = next(k for k in keys if keys.count(k) > 1)
            raise MinisftError(f"{path}: {what}: {twice!r} appears twice")
        return dict(pairs)
    try:
        out = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=no_repeats)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MinisftError(f"{path}: cannot read {what}: {e}") from None
    if not isinstance(out, dict):
        raise MinisftError(f"{path}: {what} must be a JSON object")
    return out


def family_of_config(path: Path, hf: dict) -> str:
    """"gpt2" or "llama": config.json's model_type (GPT-2's oldest files have none)."""
    kind = hf.get("model_type", "gpt2")
    if kind == "gpt2":
        return "gpt2"
    if kind in llama.ARCHITECTURES.values():
        return "llama"
    runs = ", ".join(map(repr, llama.ARCHITECTURES.values()))
    raise MinisftError(f"{path}: model_type is {kind!r} (architectures {hf.get('architectures')}); minisft "
                       f"runs GPT-2 ('gpt2') and the Llama family ({runs})")


def read_llama_config(path: Path, hf: dict) -> LlamaConfig:
    """A parsed Llama, Qwen2 or Qwen3 config.json -> LlamaConfig, refusals naming the file and field."""
    try:
        return llama.config_from_hf(hf)
    except KeyError as e:  # the only lookups without a default are rope_scaling's
        raise MinisftError(f"{path}: rope_scaling lacks the field {e.args[0]}") from None
    except (ValueError, TypeError) as e:
        raise MinisftError(f"{path}: {e}") from None


def read_config(path) -> GPTConfig | LlamaConfig:
    """A config.json of either family -> its config, refusals naming the file and field."""
    path = Path(path)
    hf = read_json(path, "the model config")
    return read_hf_config(path) if family_of_config(path, hf) == "gpt2" else read_llama_config(path, hf)


def read_hf_config(path) -> GPTConfig:
    """config.json of a GPT-2 folder -> GPTConfig. The head is tied only where the file says
    "tie_word_embeddings": true; OpenAI's configs do not, so they load untied, the book's model
    (the head starts as a copy of wte). Dropout is not taken from the file: fine-tuning uses 0.0."""
    path = Path(path)
    hf = read_json(path, "the model config")
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


def read_index(path) -> dict:
    """model.safetensors.index.json -> {shard file name: [the tensor names its weight_map puts there]},
    shards in file-name order (model-00001-of-n first). Every name appears once (read_json refuses a
    repeated key)."""
    path = Path(path)
    index = read_json(path, "the shard index")
    wmap = index.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise MinisftError(f"{path}: the shard index has no weight_map object naming each tensor's shard")
    shards: dict = {}
    for name, shard in wmap.items():
        if not isinstance(shard, str) or not SHARD_NAME.fullmatch(shard):
            raise MinisftError(f"{path}: weight_map puts tensor {name!r} in {shard!r}, which is not a "
                               ".safetensors file name beside the index")
        shards.setdefault(shard, []).append(name)
    return dict(sorted(shards.items()))


def read_llama_weights(files: dict, cfg: LlamaConfig, file_tied: bool, where: str) -> dict:
    """Llama-family safetensors files -> {minisft name: float32 array} for a model of shape cfg.

    files: {path: the tensor names an index assigns it, or None for a lone model.safetensors}.
    file_tied: the folder's own config ties the head (an untied cfg then starts lm_head as a copy of
    embed_tokens; without the tie, a missing lm_head.weight is an error). Every header is checked
    (names, shapes, the index's assignment) before any data is read; then the files are read
    memory-mapped one at a time, each tensor checked finite and copied into its place in the fused
    (in, out) tensors, so the peak is the float32 model plus one widened tensor."""
    layout = llama.hf_layout(cfg)
    ours = llama.param_shapes(cfg)
    copy_head = not cfg.tie_embeddings and file_tied   # the head: embed_tokens' copy, not in the file
    want = {hf: llama.hf_shape(piece, ours[piece.ours]) for hf, piece in layout.items()
            if not (copy_head and hf == HEAD)}
    found: dict = {}   # HF name -> (path, shape)
    for path, listed in files.items():
        header = safetensors.read_header(path)[0]
        if listed is not None and set(header) != set(listed):
            stray, absent = sorted(set(header) - set(listed)), sorted(set(listed) - set(header))
            raise MinisftError(f"{path}: the shard does not hold the tensors the index names for it: in the "
                               f"shard only {few(stray)}; in the index only {few(absent)}")
        # An index maps each name to one shard and each shard holds exactly its names: no name twice.
        found.update({name: (path, shape) for name, (_, shape, _, _) in header.items()})
    if not cfg.tie_embeddings and not file_tied and HEAD not in found:
        raise MinisftError(f"{where}: the config leaves the head untied (tie_word_embeddings is not true) but "
                           f"{HEAD} is missing")
    spare_head = cfg.tie_embeddings and HEAD in found  # a tied head saved anyway: checked, then dropped
    check_tensors(where, {n: shape for n, (_, shape) in found.items() if not (spare_head and n == HEAD)}, want)
    if spare_head and found[HEAD][1] != want[EMBED]:
        raise MinisftError(f"{where}: tensor {HEAD!r} has shape {found[HEAD][1]}, the tied head needs {want[EMBED]}")

    params = {n: np.empty(shape, np.float32) for n, shape in ours.items() if not (copy_head and n == HEAD)}
    for path in files:  # each file's map is released (its views gone) before the next is opened
        _read_into(params, path, layout, skip=HEAD if spare_head else None)
    if spare_head:  # compared with embed_tokens now that it is read, whichever file holds it
        path = found[HEAD][0]
        if not np.array_equal(safetensors.open_lazily(path)[1](HEAD), params["embed_tokens.weight"]):
            raise MinisftError(f"{path}: the model ties the head to embed_tokens but {HEAD} differs from {EMBED}")
    if copy_head:
        params[HEAD] = params["embed_tokens.weight"].copy()
    return {n: params[n] for n in ours}


def _read_into(params: dict, path: Path, layout: dict, skip: str | None) -> None:
    """Copy each tensor of one safetensors file (but skip) into its columns of the fused params,
    transposing nn.Linear (out, in) pieces to our (in, out); every value checked finite first."""
    header, read, _ = safetensors.open_lazily(path)
    for name in header:
        if name == skip:
            continue
        a = read(name)
        bad = np.size(a) - np.count_nonzero(np.isfinite(a))
        if bad:
            raise MinisftError(f"{path}: tensor {name!r} holds {bad} non-finite values (NaN or inf)")
        piece = layout[name]
        params[piece.ours][..., piece.start:piece.stop or None] = a.T if piece.linear else a


def requested_config(model) -> GPTConfig | LlamaConfig | None:
    """model= as given: None, a config, or a preset name of either family -> its config."""
    if not isinstance(model, str):
        return model
    if model in GPT2_PRESETS:
        return GPTConfig.preset(model)
    shape = LLAMA_HUB[model].shape if model in LLAMA_HUB else model
    if shape in llama.PRESETS:
        return LlamaConfig(**llama.PRESETS[shape])
    raise MinisftError(f"unknown model preset {model!r}; choose one of {', '.join(PRESETS)}")


def read_pretrained(name_or_path, cache_dir=None, model=None,
                    base_url=None) -> tuple[GPTConfig | LlamaConfig, dict]:
    """Pretrained weights -> (config, {our name: array}). name_or_path: a preset (gpt2-small|medium|large|xl,
    or a Llama-family one of LLAMA_HUB; downloaded once into the cache), an HF-style folder (config.json
    + model.safetensors or a sharded model.safetensors.index.json), or a .safetensors file. model: a
    preset name or config giving the shape (required for a bare file); with a folder it must agree with
    config.json, and None takes the folder's. The model's own settings (untied head, dropout, qkv bias)
    come from it."""
    want = requested_config(model)
    source = str(name_or_path)
    preset = source in HF_REPOS or source in LLAMA_HUB
    if preset:
        folder = fetch_preset(source, cache_dir, base_url)
    elif Path(source).is_dir():
        folder = Path(source)
    elif Path(source).is_file():
        folder = None
    else:
        raise MinisftError(f"pretrained weights {source!r}: not a preset ({DOWNLOADS}) and no such file or folder")
    try:
        return _read_source(folder, Path(source), want)
    except MinisftError as e:
        raise (_drop_bad_download(folder, e) if preset else e) from None


def _read_source(folder: Path | None, source: Path, want) -> tuple[GPTConfig | LlamaConfig, dict]:
    if folder is None:
        if want is None:
            raise MinisftError(f"{source}: a bare .safetensors file carries no shape; name the model "
                               f"preset it belongs to (model=/--model, one of {DOWNLOADS})")
        if isinstance(want, LlamaConfig):
            return want, read_llama_weights({source: None}, want, want.tie_embeddings, str(source))
        return want, read_gpt2_weights(source, want)
    config = folder / "config.json"
    if not config.is_file():
        raise MinisftError(f"{folder}: not a model folder: config.json is missing")
    hf = read_json(config, "the model config")
    if family_of_config(config, hf) == "gpt2":
        weights = folder / WEIGHTS
        if not weights.is_file():
            raise MinisftError(f"{folder}: not a GPT-2 folder: {WEIGHTS} is missing")
        cfg = read_hf_config(config)
        if want is not None:
            if not isinstance(want, GPTConfig):
                raise MinisftError(f"{config} describes a GPT-2; the requested model is a {want.arch} (Llama family)")
            _agree(config, cfg, want, SHAPE_FIELDS)
            cfg = want
        return cfg, read_gpt2_weights(weights, cfg)

    found = read_llama_config(config, hf)
    cfg = found
    if want is not None:
        if not isinstance(want, LlamaConfig):
            raise MinisftError(f"{config} describes a {found.arch} (Llama family); the requested model is a GPT-2")
        _agree(config, found, want, LLAMA_SHAPE_FIELDS)
        cfg = want
    if (folder / INDEX).is_file():
        shards = read_index(folder / INDEX)
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise MinisftError(f"{folder / INDEX}: names shards that are not in the folder: {', '.join(missing)}")
        files: dict = {folder / s: names for s, names in shards.items()}
        where = f"{folder / INDEX} (a {cfg.arch} with {cfg.n_layers} layers, d={cfg.emb_dim}, vocab {cfg.vocab_size})"
    elif (folder / WEIGHTS).is_file():
        files = {folder / WEIGHTS: None}
        where = f"{folder / WEIGHTS} (a {cfg.arch} with {cfg.n_layers} layers, d={cfg.emb_dim}, vocab {cfg.vocab_size})"
    else:
        raise MinisftError(f"{folder}: holds neither {WEIGHTS} nor {INDEX}")
    return cfg, read_llama_weights(files, cfg, found.tie_embeddings, where)


def _agree(config: Path, cfg, want, names) -> None:
    differ = [f"{f} {getattr(cfg, f)} vs {getattr(want, f)}" for f in names if getattr(cfg, f) != getattr(want, f)]
    if differ:
        raise MinisftError(f"{config} does not describe the requested model: " + ", ".join(differ))


def source_folder(weights, model, cache_dir=None) -> Path | None:
    """The Hugging Face folder a model comes from (where its tokenizer files are): `weights` when it is
    a folder, else a Llama-family preset's download (fetched once), else None (GPT-2's presets and
    bare files carry no tokenizer: GPT-2's is built in)."""
    if isinstance(weights, str) and weights:
        return Path(weights) if Path(weights).is_dir() else None
    return fetch_preset(model, cache_dir) if isinstance(model, str) and model in LLAMA_HUB else None


def read_generation_config(folder) -> list[int]:
    """The end-of-sequence token ids of an HF folder: generation_config.json's eos_token_id (an id or
    a list of them), else config.json's, else []."""
    for fname in ("generation_config.json", "config.json"):
        path = Path(folder) / fname
        if not path.is_file():
            continue
        eos = read_json(path, "the generation config" if fname.startswith("gen") else "the model config").get(
            "eos_token_id")
        ids = [eos] if type(eos) is int else eos
        if ids is None or ids == []:
            continue
        if not isinstance(ids, list) or not all(type(i) is int and i >= 0 for i in ids):
            raise MinisftError(f"{path}: eos_token_id must be a token id or a list of token ids, got {eos!r}")
        return ids
    return []


def _drop_bad_download(folder: Path, e: MinisftError):
    """A preset's cached files that do not load (the server sent an error page, a cut file): removed,
    so the next run downloads them again instead of failing on the same junk forever. The folder holds
    only what fetch_preset put there; a .part is an unfinished download, not what failed to load."""
    for f in folder.iterdir():
        if f.is_file() and not f.name.endswith(".part"):
            f.unlink()
    return MinisftError(f"{e}; the downloaded files were removed from the cache ({folder}), so the next run "
                        "downloads them again")


# ---- weights out ------------------------------------------------------------------------------------
def save_pretrained(model, out_dir) -> Path:
    """Write model as an HF folder (config.json + model.safetensors, float32) that
    transformers' from_pretrained loads (GPT2LMHeadModel, or the Llama family's class) and
    `read_pretrained` reads back bit-exact (for a float32 model). A GPT-2 without qkv bias is written
    with zero c_attn biases, which GPT-2 requires and which compute the same."""
    if model.lora is not None:
        raise ValueError("save_pretrained: the model carries LoRA adapters; write them with "
                         "minisft.lora.save_adapter, or fold them in first with minisft.lora.merge")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model.cfg, LlamaConfig):
        return _save_llama(model, out)
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


def _save_llama(model, out: Path) -> Path:
    """A Llama-family model -> its HF folder, in Hugging Face names and (out, in) Linear layout; a tied
    head is not written (transformers ties lm_head to embed_tokens on load)."""
    layout = llama.hf_layout(model.cfg)
    shapes = {hf: llama.hf_shape(piece, tuple(model.params[piece.ours].shape)) for hf, piece in layout.items()}
    host: dict = {}  # the one minisft tensor on the host: a fused tensor's pieces are consecutive in layout

    def array_of(hf):
        piece = layout[hf]
        if piece.ours not in host:
            host.clear()
            host[piece.ours] = model.B.to_numpy(model.params[piece.ours])
        return llama.hf_array(piece, host[piece.ours])
    safetensors.save_streamed(out / WEIGHTS, shapes, array_of, metadata={"format": "pt"})
    write_json(out / "config.json", llama.hf_config(model.cfg), indent=2)
    return out
