"""Test helpers: GPT-2 files in Hugging Face's format written from scratch, and a loopback HTTP
server that serves them with Range support (and can misbehave on purpose).

The safetensors writer here is deliberately independent of minisft/safetensors.py, so the reader
is tested against files it did not write.
"""
import http.server
import json
import re
import threading
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


class FileServer:
    """Serves the files under `root` on 127.0.0.1 from a thread, honouring `Range: bytes=N-`.

    requests: (path, Range header or None) of every GET, in order.
    drop_after: {url path: K}: the next GET of that path sends full headers but only K bytes, then
    closes the connection (one drop per entry, so a retry succeeds; set `drops` for more).
    ignore_range: answer every request with the whole file (200), as some servers do.
    """

    def __init__(self, root):
        self.root = Path(root)
        self.requests, self.drop_after, self.drops, self.ignore_range = [], {}, {}, False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                f = server.root / self.path.lstrip("/")
                if ".." in self.path or not f.is_file():
                    self.send_error(404)
                    return
                data = memoryview(f.read_bytes())
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and not server.ignore_range:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.drops.get(self.path, 0) > 0:
                    server.drops[self.path] -= 1
                    body = body[:server.drop_after[self.path]]
                self.wfile.write(body)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def drop(self, path: str, after: int, times: int = 1) -> None:
        self.drop_after[path], self.drops[path] = after, times

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
