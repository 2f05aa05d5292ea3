"""Test helpers: GPT-2 files in Hugging Face's format written from scratch (tests/file_server.py
serves them over HTTP).

The safetensors writer here is deliberately independent of minisft/safetensors.py, so the reader
is tested against files it did not write.
"""
import json
from pathlib import Path

import numpy as np

from minisft.model import param_shapes

CODES = {"F32": "<f4", "F16": "<f2"}


def to_bf16_bits(a) -> np.ndarray:
    """float32 -> the uint16 bit patterns of bfloat16 (truncation: the top half of each float32)."""
    return (np.asarray(a, dtype="<f4").view("<u4") >> 16).astype("<u2")


def write_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """tensors: {name: (code, array)} with code F32, F16 or BF16 (arrays of float32 values)."""
    header, blobs, pos = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (code, a) in tensors.items():
        raw = to_bf16_bits(a) if code == "BF16" else np.asarray(a, CODES[code])
        header[name] = {"dtype": code, "shape": list(np.shape(a)), "data_offsets": [pos, pos + raw.nbytes]}
        blobs.append(raw)
        pos += raw.nbytes
    write_raw(path, json.dumps(header).encode(), *blobs)


def write_raw(path, header: bytes, *data) -> None:
    """The file as given: header length, header bytes, then each piece of data (bytes or arrays)."""
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for d in data:
            f.write(d.tobytes() if isinstance(d, np.ndarray) else d)


def gpt2_state(cfg, seed=0) -> dict:
    """Fresh random float32 weights for every parameter of cfg, by HF name: uniform in [-0.1, 0.1)
    (cheaper to draw than normals at 124M parameters; no zeros, no ones)."""
    rng = np.random.default_rng(seed)
    out = {}
    for n, s in param_shapes(cfg).items():
        a = rng.random(s, dtype=np.float32)
        a -= np.float32(0.5)
        a *= np.float32(0.2)
        out[n] = a
    return out


def hf_config_like_openai(cfg) -> dict:
    """config.json as openai-community/gpt2 has it: no tie_word_embeddings (so HF ties by default)."""
    return {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
            "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": cfg.context_length,
            "n_embd": cfg.emb_dim, "n_head": cfg.n_heads, "n_layer": cfg.n_layers,
            "n_positions": cfg.context_length, "resid_pdrop": 0.1, "vocab_size": cfg.vocab_size}


def write_gpt2_folder(folder, cfg, sd: dict, prefix=True, mask_buffers=True, code="F32", config=None) -> Path:
    """An HF GPT-2 folder holding sd (our names): tensors sorted by name as in the real files,
    optionally `transformer.`-prefixed (lm_head.weight never is) and with the causal-mask buffers."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, a in sd.items():
        key = name if name == "lm_head.weight" or not prefix else "transformer." + name
        tensors[key] = (code, a)
    if mask_buffers:
        pre = "transformer." if prefix else ""
        C = cfg.context_length
        for i in range(cfg.n_layers):
            tensors[f"{pre}h.{i}.attn.bias"] = ("F32", np.tril(np.ones((C, C), np.float32))[None, None])
            tensors[f"{pre}h.{i}.attn.masked_bias"] = ("F32", np.array(-1e4, np.float32))
    write_safetensors(folder / "model.safetensors", dict(sorted(tensors.items())), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config or hf_config_like_openai(cfg), indent=2))
    return folder

