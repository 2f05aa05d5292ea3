"""GPT-2 and the Llama family with a hand-written backward pass, running on any backend.

The model owns its parameters under their Hugging Face names (the Llama family's without `model.`,
its q/k/v and gate/up projections fused: minisft/llama.py) in Conv1D layout: linear weights are
(in, out). A family (minisft/family.py) gives the block as a list of stages (GPT-2's in
minisft/block.py, the Llama family's in minisft/llama.py): `_walk` runs them forward, each stage
through its op's forward here (layernorm, rmsnorm, linear, rope, attention, gelu, swiglu, residual),
keeping the activations the backward reads; `_walk_backward` undoes them in reverse through each
op's backward, written beside its forward. All arithmetic goes through the backend; numpy appears
here only where arrays enter or leave the model (initial values, state dicts, logits and gradients).

One GPT-2 block, forward (shapes for a packed batch of N positions, width d):

    x (N, d) ─┬─ ln_1 ─ c_attn (N, 3d) ─ attention (N, d) ─ c_proj ─ dropout ─(+)─ x2 (N, d)
              └──────────────────────────────────────────────────────────────┘
    x2 ───────┬─ ln_2 ─ c_fc (N, 4d) ─ gelu ─ c_proj (N, d) ─ dropout ─(+)─ next x (N, d)
              └──────────────────────────────────────────────────────────┘

Decoding (`prefill`, `decode`) runs the same `_walk` code; only the attention differs: it also keeps
every layer's keys and values in a KV cache, and a new token attends over its sequence's cache.
"""
import math
from dataclasses import dataclass, field

import numpy as np

from .backends import get_backend
from .batch import IGNORE_INDEX, PackedBatch, pack_padded
from .config import GPTConfig, check_tensors
from .family import family_of, param_shapes
from .llama import LlamaConfig, rope_tables
from .pretrained import read_pretrained, save_pretrained


class GPT:
    def __init__(self, cfg: GPTConfig | LlamaConfig, backend="numpy", dtype="float32", seed=0, device=None,
                 params=None):
        """cfg: a GPT-2 (GPTConfig) or Llama-family (LlamaConfig) shape. params: {name: numpy array} to
        start from (pretrained weights, a checkpoint) instead of the random initialisation, which then
        never runs (it would cost a float64 copy of the model)."""
        self.cfg = cfg
        self.family = family_of(cfg)
        self.B = get_backend(backend, dtype, device) if isinstance(backend, str) else backend
        if self.family.positions is None:  # RoPE: every position's cos and sin, (C, hd/2) each
            self.rope = tuple(self.B.from_numpy(t) for t in rope_tables(cfg.head_dim, cfg.context_length,
                                                                        cfg.rope_theta, cfg.rope_scaling))
        self.rng = self.B.rng(seed)  # drives the initial values, then the dropout masks
        self.frozen = set()          # names that get no gradient (their dW is never computed)
        self.lora = None             # minisft.lora.Lora once adapters are attached (lora.attach)
        # Activation checkpointing: the training forward keeps only each block's input (and the
        # dropout RNG state there); the backward recomputes the block's activations from it.
        self.grad_checkpoint = False
        # Fused updates: on_grad(name, grad) is called as soon as a tensor's gradient is complete in
        # the backward, and the gradient is not kept (None: accumulate into self.grads).
        self.on_grad = None
        if params is None:  # drawn straight into the weights' storage precision (float32 unless float64)
            params = self.family.init(cfg, self.rng, np.float64 if self.dtype == "float64" else np.float32)
            self.load_state_dict(params, consume=True)  # our own arrays: each freed once converted
        else:
            self.load_state_dict(params)
        # load_state_dict also starts self.grads: name -> gradient, accumulated by forward_backward

    @classmethod
    def from_pretrained(cls, name_or_path, backend="numpy", dtype="float32", cache_dir=None, device=None,
                        model=None, seed=0, base_url=None) -> "GPT":
        """Pretrained weights by preset name (OpenAI's GPT-2, or a Llama-family model from the hub;
        downloaded once), or a Hugging Face folder of either family, or a .safetensors file; see
        minisft.pretrained.read_pretrained. seed seeds the dropout RNG."""
        cfg, sd = read_pretrained(name_or_path, cache_dir=cache_dir, model=model, base_url=base_url)
        return cls(cfg, backend=backend, dtype=dtype, seed=seed, device=device, params=sd)

    def save_pretrained(self, out_dir):
        """Write a Hugging Face folder of the model's architecture (config.json + model.safetensors); see
        minisft.pretrained.save_pretrained."""
        return save_pretrained(self, out_dir)

    @property
    def dtype(self) -> str:
        return self.B.dtype

    @property
    def head_name(self) -> str:
        return self.family.embed if self.cfg.tie_embeddings else "lm_head.weight"

    def num_params(self) -> int:
        return sum(math.prod(s) for s in param_shapes(self.cfg).values())

    # ---- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """HF name -> numpy array (a copy, in the model's dtype)."""
        return {n: self.B.to_numpy(p) for n, p in self.params.items()}

    def load_state_dict(self, sd: dict, consume: bool = False) -> None:
        """Load every parameter by HF name; arrays are cast to the model's dtype. consume: remove each
        entry from sd as it is converted, so the peak is one copy of the model plus one tensor."""
        shapes = param_shapes(self.cfg)
        check_tensors("state dict", {n: np.shape(a) for n, a in sd.items()}, shapes)
        self.params = {n: self.B.from_numpy(sd.pop(n) if consume else sd[n]) for n in shapes}
        self.grads = {}

    def zero_grad(self) -> None:
        self.grads = {}

    def accumulate(self, name, g) -> None:
        """Add a fresh gradient into self.grads (first contribution: just keep the array)."""
        if name in self.frozen:
            return
        if self.on_grad is not None:  # every tensor passed here gets one contribution per backward
            self.on_grad(name, g)
            return
        if name in self.grads:
            self.B.add_(self.grads[name], g)
        else:
            self.grads[name] = g

    def _complete(self, name) -> None:
        """A scatter-added gradient buffer is final: hand it to on_grad, if set, and drop it."""
        if self.on_grad is not None and name in self.grads:
            self.on_grad(name, self.grads.pop(name))

    def _grad_buffer(self, name):
        """The accumulation buffer for kernels that scatter-add into it (embeddings, head)."""
        if name not in self.grads:
            self.grads[name] = self.B.zeros_like(self.params[name])
        return self.grads[name]

    # ---- forward -----------------------------------------------------------------------------------
    def _check(self, batch: PackedBatch) -> None:
        if batch.num_tokens == 0:
            raise ValueError("empty batch: no positions to run")
        if batch.positions.max() >= self.cfg.context_length:
            raise ValueError(f"a sequence of {batch.max_seqlen()} tokens exceeds the context length "
                             f"{self.cfg.context_length}")
        if batch.tokens.min() < 0 or batch.tokens.max() >= self.cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size})")

    def _dropout(self, x, train):
        if not train or self.cfg.drop_rate == 0.0:
            return x, None
        return self.B.dropout_forward(x, self.cfg.drop_rate, self.rng)

    def _block(self, i, x, run: "Pass"):
        """Block i on x (N, d) -> (next x (N, d), the activations its backward needs): the family's
        stages, walked in order (see _walk)."""
        return self._walk(self.family.stages(self.cfg), self.family.layer.format(i), x, run, i)

    def _walk(self, stages, h, x, run: "Pass", i=-1):
        """stages on x, their parameters under the name prefix h -> (the last stage's output, the
        activations their backward needs). Each stage runs through its op's forward below; run.attend
        (i, qkv) -> (out, ctx) is the attention: packed causal attention in training and prefill,
        attention over the KV cache when decoding. Everything else is the same code."""
        v, a = {"x": x}, Activations({}, {}, {})
        for st in stages:
            v[st.out] = self._OPS[st.op][0](self, st, h, a, *[v[n] for n in st.ins], run=run, i=i)
        a.values = {n: v[n] for st in stages for n in self._kept(st)}  # what the backward reads
        return v[stages[-1].out], a

    @staticmethod
    def _kept(st) -> tuple:
        """The values a stage's backward reads: its inputs (a residual and a rotation read none), attention
        its output too."""
        return () if st.op in ("residual", "rope") else st.ins + ((st.out,) if st.op == "attention" else ())

    # ---- the block's ops: each forward beside the backward that undoes it -----------------------------
    # forward(self, stage, h, a, *inputs, run, i) -> output; what it keeps goes in a.saved.
    # backward(self, stage, h, a, dout, c, dskip) -> one gradient per input; dskip: the gradient the
    # stage's input already has from its other reader (the skip path), which a layernorm adds in.
    def _layernorm_forward(self, st, h, a, x, **_):
        # out = layernorm(x; w, b)
        w, b = st.params(h)
        out, mean, rstd = self.B.layernorm_forward(x, self.params[w], self.params[b])        # (N, d)
        a.saved[st.out] = (mean, rstd)
        return out

    def _layernorm_backward(self, st, h, a, dout, c, dskip):
        # undoes out = layernorm(x; w, b), and adds dskip, the gradient of x's other reader
        (x,), (w, b), (mean, rstd) = st.ins, st.params(h), a.saved[st.out]
        dx, dw, db = self.B.layernorm_backward(dout, a.values[x], self.params[w], mean, rstd, dskip=dskip)
        self.accumulate(w, dw)
        self.accumulate(b, db)
        return (dx,)                                                                       # (N, d)

    def _linear_forward(self, st, h, a, x, run, **_):
        # out = dropout(x @ w + b + the adapters' update of x)   (dropout: the stages marked so)
        w, b = st.params(h)
        y = self.B.linear_forward(x, self.params[w], self.params.get(b))                    # (N, out)
        self._adapt(h + st.module, x, y, a.lora, run.train)
        if st.dropout:
            y, a.saved[st.out] = self._dropout(y, run.train)
        return y

    def _linear_backward(self, st, h, a, dout, c, dskip):
        # undoes out = dropout(x @ w + b + the adapters' update of x)
        (x,), (w, b) = st.ins, st.params(h)
        if st.dropout and a.saved[st.out] is not None:
            dout = self.B.dropout_backward(dout, a.saved[st.out])
        dx, dw, db = self.B.linear_backward(dout, a.values[x], self.params[w], w not in self.frozen)  # (N, in)
        self._adapt_backward(h + st.module, dout, a.lora, dx)
        self.accumulate(w, dw)
        if b in self.params:  # the book's config has no c_attn bias, the Llama family none but Qwen2's q/k/v
            self.accumulate(b, db)
        return (dx,)

    def _attention_forward(self, st, h, a, qkv, run, i, **_):
        # out = attention(qkv)
        out, a.saved[st.out] = run.attend(i, qkv)                                            # (N, H hd)
        return out

    def _attention_backward(self, st, h, a, dout, c, dskip):
        # undoes out = attention(qkv)
        qkv = st.ins[0]
        return (self.B.attention_backward(dout, a.values[qkv], a.values[st.out], a.saved[st.out], c.cu,
                                          self.cfg.n_heads, c.max_len, n_kv_heads=self.cfg.n_kv_heads),)  # (N, W)

    def _gelu_forward(self, st, h, a, x, **_):
        # out = gelu(x)
        return self.B.gelu_forward(x)                                                       # (N, 4d)

    def _gelu_backward(self, st, h, a, dout, c, dskip):
        # undoes out = gelu(x)
        return (self.B.gelu_backward(dout, a.values[st.ins[0]]),)                           # (N, 4d)

    def _rmsnorm_forward(self, st, h, a, x, **_):
        # out = rmsnorm(x; w)
        (w,) = st.params(h)
        out, a.saved[st.out] = self.B.rmsnorm_forward(x, self.params[w], self.cfg.rms_eps)   # (N, d)
        return out

    def _rmsnorm_backward(self, st, h, a, dout, c, dskip):
        # undoes out = rmsnorm(x; w), and adds dskip, the gradient of x's other reader
        (x,), (w,) = st.ins, st.params(h)
        dx, dw = self.B.rmsnorm_backward(dout, a.values[x], self.params[w], a.saved[st.out], dskip=dskip)
        self.accumulate(w, dw)
        return (dx,)                                                                       # (N, d)

    def _qk_norm_forward(self, st, h, a, qkv, **_):
        # out = the per-head rmsnorm of qkv's query and key heads (q_norm, k_norm)
        wq, wk = st.params(h)
        out, a.saved[st.out] = self.B.qk_norm_forward(qkv, self.params[wq], self.params[wk], self.cfg.rms_eps,
                                                      self.cfg.n_heads, self.cfg.n_kv_heads)  # (N, W)
        return out

    def _qk_norm_backward(self, st, h, a, dout, c, dskip):
        # undoes out = the per-head rmsnorm of qkv's query and key heads
        (qkv,), (wq, wk) = st.ins, st.params(h)
        dqkv, dwq, dwk = self.B.qk_norm_backward(dout, a.values[qkv], self.params[wq], self.params[wk],
                                                 a.saved[st.out], self.cfg.n_heads, self.cfg.n_kv_heads)
        self.accumulate(wq, dwq)
        self.accumulate(wk, dwk)
        return (dqkv,)                                                                     # (N, W)

    def _rope_forward(self, st, h, a, qkv, run, **_):
        # out = qkv with its query and key heads rotated by their position's angles
        return self.B.rope_forward(qkv, *self.rope, run.positions, self.cfg.n_heads + self.cfg.n_kv_heads)  # (N, W)

    def _rope_backward(self, st, h, a, dout, c, dskip):
        # undoes out = rotate(qkv): the rotation back
        return (self.B.rope_backward(dout, *self.rope, c.positions, self.cfg.n_heads + self.cfg.n_kv_heads),)

    def _swiglu_forward(self, st, h, a, gu, **_):
        # out = silu(gate) * up
        return self.B.swiglu_forward(gu)                                                    # (N, f)

    def _swiglu_backward(self, st, h, a, dout, c, dskip):
        # undoes out = silu(gate) * up
        return (self.B.swiglu_backward(dout, a.values[st.ins[0]]),)                         # (N, 2f)

    def _residual_forward(self, st, h, a, x, y, **_):
        # out = x + y
        return self.B.residual_forward(x, y)                                                # (N, d)

    def _residual_backward(self, st, h, a, dout, c, dskip):
        # undoes out = x + y: dx = dy = dout; x's goes on to the layernorm that read x too (its dskip)
        return self.B.residual_backward(dout)

    _OPS = {"layernorm": (_layernorm_forward, _layernorm_backward), "linear": (_linear_forward, _linear_backward),
            "attention": (_attention_forward, _attention_backward), "gelu": (_gelu_forward, _gelu_backward),
            "residual": (_residual_forward, _residual_backward), "rmsnorm": (_rmsnorm_forward, _rmsnorm_backward),
            "qk_norm": (_qk_norm_forward, _qk_norm_backward), "rope": (_rope_forward, _rope_backward),
            "swiglu": (_swiglu_forward, _swiglu_backward)}

    def _adapt(self, module, x, y, a, train) -> None:
        """y += module's LoRA update of x, in place (nothing without adapters); see minisft.lora."""
        if self.lora is not None:
            self.lora.forward(self, module, x, y, a, train)

    def _adapt_backward(self, module, dy, a, dx) -> None:
        """The adapters' gradients from dy, their input gradient added into dx (in place)."""
        if self.lora is not None:
            self.lora.backward(self, module, dy, a, dx)

    def _head_logits(self, lnf):
        """lnf (N, d) -> logits (N, V), the head adapter's update included."""
        logits = self.B.head_logits(lnf, self.params[self.head_name])                       # (N, V)
        if self.lora is not None:
            self.lora.head_logits_(self, lnf, logits)
        return logits

    def _forward(self, batch: PackedBatch, train: bool, keep: bool, attend=None):
        """-> final hidden lnf (N, d) and, when keep, everything the backward needs.
        attend: see _walk; by default packed causal attention over the batch's sequences."""
        B, P, cfg, fam = self.B, self.params, self.cfg, self.family
        self._check(batch)
        tokens, positions = B.index(batch.tokens), B.index(batch.positions)  # (N,)
        cu, max_len, H = B.index(batch.cu_seqlens), batch.max_seqlen(), cfg.n_heads
        if attend is None:
            attend = lambda i, qkv: B.attention_forward(qkv, cu, H, max_len, n_kv_heads=cfg.n_kv_heads)  # noqa: E731
        run = Pass(attend, train, positions)

        if fam.positions is None:  # the Llama family: positions enter by the rotation of q and k
            x = B.token_embedding_forward(tokens, P[fam.embed])                            # (N, d)
        else:
            x = B.embedding_forward(tokens, positions, P[fam.embed], P[fam.positions])     # (N, d)
        x, emb_mask = self._dropout(x, train)
        acts = []
        for i in range(cfg.n_layers):
            if keep and self.grad_checkpoint:
                kept = Checkpoint(x, self.rng.bit_generator.state)  # the block's input, its masks' seed
                x, _ = self._block(i, x, run)                                              # (N, d)
                acts.append(kept)
                continue
            x, a = self._block(i, x, run)                                                  # (N, d)
            if keep:
                acts.append(a)
        lnf, final = self._walk((fam.final,), "", x, run)                                  # (N, d)
        cache = ForwardCache(tokens, positions, cu, max_len, emb_mask, acts, final, run) if keep else None
        return lnf, cache

    # ---- backward ----------------------------------------------------------------------------------
    def _recompute(self, i, kept: "Checkpoint", c: "ForwardCache") -> "Activations":
        """Block i's activations again, from the input the checkpointed forward kept: the same
        kernels on the same input, with the dropout RNG put back to where it stood then, so every
        value (masks included) equals the first forward's and the gradients are the plain path's."""
        now = self.rng.bit_generator.state
        self.rng.bit_generator.state = kept.rng
        _, a = self._block(i, kept.x, c.run)
        self.rng.bit_generator.state = now
        return a

    def _backward(self, dlnf, c: "ForwardCache") -> None:
        """dlnf (N, d): gradient at the final norm's output. Accumulates into self.grads."""
        B, fam = self.B, self.family
        dx = self._walk_backward((fam.final,), "", dlnf, c.final, c)                       # (N, d)
        for i in reversed(range(self.cfg.n_layers)):
            a = c.acts[i]
            if isinstance(a, Checkpoint):  # only the input was kept
                a = self._recompute(i, a, c)
            dx = self._walk_backward(fam.stages(self.cfg), fam.layer.format(i), dx, a, c)  # (N, d)
        if c.emb_mask is not None:
            dx = B.dropout_backward(dx, c.emb_mask)
        tables = [n for n in (fam.embed, fam.positions) if n is not None]
        if set(tables) - self.frozen:
            if fam.positions is None:
                B.token_embedding_backward(self._grad_buffer(fam.embed), dx, c.tokens)
            else:
                B.embedding_backward(self._grad_buffer(fam.embed), self._grad_buffer(fam.positions),
                                     dx, c.tokens, c.positions)
            for n in self.frozen & set(tables):
                del self.grads[n]
            for n in tables:
                self._complete(n)

    def _walk_backward(self, stages, h, dout, a: "Activations", c: "ForwardCache"):
        """dout at the last stage's output -> the gradient at the input x: the stages undone in
        reverse, each through its op's backward (beside its forward, above)."""
        grads = {stages[-1].out: dout}
        for st in reversed(stages):
            # x and x2 feed both a norm and the skip path: the skip path's gradient, there first, is
            # added in the norm's backward (dskip)
            dskip = grads.pop(st.ins[0], None)
            assert dskip is None or st.op in ("layernorm", "rmsnorm"), f"{st.out}: only a norm adds a second gradient"
            for n, g in zip(st.ins, self._OPS[st.op][1](self, st, h, a, grads.pop(st.out), c, dskip)):
                grads[n] = g
        return grads["x"]

    # ---- the entry points ------------------------------------------------------------------------------
    def forward_backward(self, batch: PackedBatch, grad_scale: float | None = None):
        """Training step on a packed batch: returns (loss_sum, n_valid) and adds
        grad_scale * d(loss_sum)/d(params) into self.grads (call zero_grad() between optimizer steps).

        grad_scale defaults to 1/n_valid: the gradient of this batch's mean loss. Gradient
        accumulation passes 1/(valid targets in the whole window) instead, so K micro-batches give
        exactly the gradient of one batch holding them all.
        """
        n_valid = batch.num_valid
        if n_valid == 0:
            raise ValueError("batch has no valid targets: every target is -100")
        scale = 1.0 / n_valid if grad_scale is None else grad_scale
        lnf, cache = self._forward(batch, train=True, keep=True)
        head = self.head_name
        # A frozen head still passes gradient to the hidden states (need_dh); its own dW is never computed.
        # A new gradient buffer is left uninitialised: the head writes it (dw_fresh), no zeroing pass.
        dw_fresh = head not in self.frozen and head not in self.grads
        if dw_fresh:
            self.grads[head] = self.B.empty_like(self.params[head])
        dw = None if head in self.frozen else self.grads[head]
        lora = self.lora.head_forward(self, lnf, cache.lora) if self.lora is not None else None
        # The targets stay on the host: the backend picks the valid rows there, without a device sync.
        loss_sum, _, dlnf = self.B.head_loss(lnf, self.params[head], batch.targets, dw=dw, grad_scale=scale,
                                             need_dh=True, lora=lora, dw_fresh=dw_fresh)
        if lora is not None:
            self.lora.head_backward(self, cache.lora, dlnf)
        if not self.cfg.tie_embeddings:  # a tied head's gradient still gets the embeddings' share
            self._complete(head)
        self._backward(dlnf, cache)
        return self.B.item(loss_sum), n_valid

    def loss(self, batch: PackedBatch):
        """Evaluation: (loss_sum, n_valid) with no gradient and no dropout."""
        lnf, _ = self._forward(batch, train=False, keep=False)
        lora = self.lora.head_forward(self, lnf, None) if self.lora is not None else None
        loss_sum, n_valid, _ = self.B.head_loss(lnf, self.params[self.head_name], batch.targets, lora=lora)
        return self.B.item(loss_sum), n_valid

    def logits_packed(self, batch: PackedBatch):
        """Logits (N, V) as a backend array."""
        lnf, _ = self._forward(batch, train=False, keep=False)
        return self._head_logits(lnf)

    def logits(self, input_ids) -> np.ndarray:
        """(B, T) token ids -> (B, T, V) logits as a numpy array."""
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"logits: input_ids must be (B, T), got shape {input_ids.shape}")
        batch = pack_padded(input_ids, np.zeros_like(input_ids), strip=False)
        return self.B.to_numpy(self.logits_packed(batch)).reshape(*input_ids.shape, -1)

    def loss_and_grad(self, input_ids, targets):
        """Padded (B, T) batch, -100 = ignored -> (mean loss over valid targets, {HF name: grad})."""
        self.zero_grad()
        loss_sum, n_valid = self.forward_backward(pack_padded(input_ids, targets, strip=False))
        return loss_sum / n_valid, {n: self.B.to_numpy(g) for n, g in self.grads.items()}

    # ---- inference: last-position logits, and decoding with a KV cache (driven by generate.py) ------
    def _last_logits(self, lnf, cu_seqlens) -> np.ndarray:
        """lnf (N, d) -> logits (S, V) of each sequence's last position, as a numpy array."""
        last = self.B.take_rows(lnf, self.B.index(np.asarray(cu_seqlens)[1:] - 1))          # (S, d)
        return self.B.to_numpy(self._head_logits(last))                                   # (S, V)

    def logits_last(self, batch: PackedBatch) -> np.ndarray:
        """The next-token logits (S, V) of every packed sequence, recomputing it whole (no cache)."""
        lnf, _ = self._forward(batch, train=False, keep=False)
        return self._last_logits(lnf, batch.cu_seqlens)

    def kv_cache(self, n_seqs: int, max_len: int) -> "KVCache":
        """An empty cache with room for max_len positions of n_seqs sequences in every layer."""
        cfg = self.cfg
        if not 0 < max_len <= cfg.context_length:
            raise ValueError(f"KV cache length {max_len} must lie in [1, context length {cfg.context_length}]")
        layers = [self.B.kv_cache_alloc(n_seqs, cfg.n_kv_heads, max_len, cfg.head_dim) for _ in range(cfg.n_layers)]
        return KVCache(layers, np.zeros(n_seqs, dtype=np.int64), max_len)

    def prefill(self, cache: "KVCache", batch: PackedBatch) -> np.ndarray:
        """Run the packed prompts of an empty cache (sequence s -> cache row s, positions from 0), keep
        every layer's keys and values -> next-token logits (S, V) as a numpy array."""
        if batch.num_seqs != len(cache.lens) or cache.lens.any():
            raise ValueError(f"prefill needs an empty cache with one row per sequence: {batch.num_seqs} "
                             f"sequences, {len(cache.lens)} rows, {int(cache.lens.sum())} positions filled")
        return self._prefill_rows(cache, batch, 0)

    def kv_cache_extend(self, cache: "KVCache", batch: PackedBatch) -> np.ndarray:
        """Add the packed prompts as new rows after the cache's S rows and run them (a server admits
        requests between decode steps this way); the rows already there keep their keys and values
        -> the new sequences' next-token logits (S_new, V) as a numpy array."""
        S, new = len(cache.lens), batch.num_seqs
        if S == 0:
            grown = self.kv_cache(new, cache.max_len)
            cache.layers, cache.lens = grown.layers, grown.lens
        else:  # row 0 copied into each new row: stale positions past a row's length are never read
            idx = self.B.index(np.concatenate([np.arange(S), np.zeros(new, dtype=np.int64)]))  # (S + new,)
            cache.layers = [(self.B.take_rows(k, idx), self.B.take_rows(v, idx)) for k, v in cache.layers]
            cache.lens = np.concatenate([cache.lens, np.zeros(new, dtype=np.int64)])
        return self._prefill_rows(cache, batch, S)

    def _prefill_rows(self, cache: "KVCache", batch: PackedBatch, first: int) -> np.ndarray:
        """Prefill sequence s into cache row first + s (those rows hold no positions yet)."""
        B, H = self.B, self.cfg.n_heads
        lengths = np.diff(batch.cu_seqlens)                                                 # (S,)
        if lengths.max(initial=0) > cache.max_len:
            raise ValueError(f"a prompt of {lengths.max()} tokens does not fit the KV cache of {cache.max_len}")
        seq_ids = B.index(first + np.repeat(np.arange(batch.num_seqs), lengths))            # (N,)
        positions, cu, max_len = B.index(batch.positions), B.index(batch.cu_seqlens), batch.max_seqlen()

        def attend(i, qkv):
            B.kv_cache_write(*cache.layers[i], qkv, seq_ids, positions)
            return B.attention_forward(qkv, cu, H, max_len, n_kv_heads=self.cfg.n_kv_heads)
        lnf, _ = self._forward(batch, train=False, keep=False, attend=attend)
        cache.lens[first:first + batch.num_seqs] = lengths
        return self._last_logits(lnf, batch.cu_seqlens)

    def kv_cache_keep(self, cache: "KVCache", rows) -> None:
        """Keep only the cache rows listed (in that order): the sequences that stopped cost nothing more."""
        idx = self.B.index(rows)                                                            # (S',)
        cache.layers = [(self.B.take_rows(k, idx), self.B.take_rows(v, idx)) for k, v in cache.layers]
        cache.lens = cache.lens[np.asarray(rows, dtype=np.int64)]

    def decode(self, cache: "KVCache", tokens) -> np.ndarray:
        """One new token per cache row, tokens (S,), at position cache.lens[s]: keep its keys and values,
        attend over the row's cache -> next-token logits (S, V) as a numpy array."""
        B, H = self.B, self.cfg.n_heads
        tokens = np.asarray(tokens, dtype=np.int64)                                         # (S,)
        S = len(cache.lens)
        if tokens.shape != (S,):
            raise ValueError(f"decode: {tokens.shape} tokens for a cache of {S} rows")
        if S and cache.lens.max() >= cache.max_len:
            raise ValueError(f"decode: the KV cache of {cache.max_len} positions is full")
        # Each new token is a one-position row of the packed batch: embeddings and the per-position
        # layers treat it like any other; only the attention (over the cache) differs.
        batch = PackedBatch(tokens, np.full(S, IGNORE_INDEX), cache.lens.copy(), np.arange(S + 1))
        rows, positions = B.index(np.arange(S)), B.index(cache.lens)                          # (S,)
        lens = B.index(cache.lens + 1)                                                      # (S,) incl. the new token
        max_len = int(cache.lens.max()) + 1

        def attend(i, qkv):
            k_cache, v_cache = cache.layers[i]
            B.kv_cache_write(k_cache, v_cache, qkv, rows, positions)
            return B.attention_decode(qkv, k_cache, v_cache, lens, H, max_len), None
        lnf, _ = self._forward(batch, train=False, keep=False, attend=attend)
        cache.lens += 1
        return B.to_numpy(self._head_logits(lnf))                                           # (S, V)


@dataclass
class KVCache:
    """Every layer's keys and values of S sequences being decoded. Row s is sequence s; lens[s] of
    its max_len positions are filled."""
    layers: list        # per layer (k_cache, v_cache), backend arrays (S, Hkv, max_len, hd) each
    lens: np.ndarray    # (S,) int64
    max_len: int


@dataclass
class Pass:
    """One forward pass's settings that every stage may read."""
    attend: object      # (i, qkv) -> (out, ctx): block i's attention (see GPT._walk)
    train: bool         # dropout on
    positions: object   # (N,) each row's position in its sequence (RoPE's angles)


@dataclass
class Activations:
    """What block i's backward reads, kept by its forward (minisft.block names the values)."""
    values: dict        # value name -> array: the inputs each stage's backward reads (model._kept)
    saved: dict         # stage out -> what its op kept: layernorm (mean, rstd), attention ctx, dropout mask
    lora: dict          # the adapters' inputs, by module (minisft.lora.Lora.forward fills it)


@dataclass
class Checkpoint:
    """A checkpointed block (--grad-checkpoint): only its input and the dropout RNG state there."""
    x: object
    rng: dict


@dataclass
class ForwardCache:
    """Everything the training forward keeps for the backward."""
    tokens: object
    positions: object
    cu: object
    max_len: int
    emb_mask: object    # the embeddings' dropout mask (None without dropout)
    acts: list          # per block: Activations, or a Checkpoint
    final: "Activations"  # the final norm's
    run: Pass           # the pass the blocks ran (a checkpointed block reruns it)
    lora: dict = field(default_factory=dict)  # the head adapter's inputs (minisft.lora.Lora.head_forward)
