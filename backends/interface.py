"""The backend interface: every kernel the GPT model calls, each forward beside its backward.

A backend is an object built for one float dtype (and, for torch, one device). Arrays it returns
live wherever the backend keeps them (numpy arrays, torch tensors); the model never looks inside,
it only passes them back: an array a kernel takes from another (the head's h from the final
layernorm, LoRA's u, layernorm's mean and rstd, attention's ctx) is the one this backend returned,
in its dtype (under bfloat16, torch keeps activations in the compute dtype). Shapes use:

    N  positions in the packed batch      S  sequences (cu_seqlens has S+1 entries)
    d  model width (emb_dim)              H  query heads, Hkv key/value heads, hd head width
    V  vocabulary size                    C  context length
    W  fused qkv width, (H + 2 Hkv) hd    f  the MLP's hidden width

GPT-2 has Hkv = H and hd = d // H, so W = 3d. The Llama family (minisft/llama.py) has grouped-query
attention (Hkv divides H: query head h reads key/value head h // (H // Hkv)) and an explicit hd.

All kernels work on the packed layout of `minisft.batch.PackedBatch`: one flat stream of N positions,
`cu_seqlens` marking sequence boundaries, attention causal and never crossing a boundary.

Backward kernels return fresh gradients (they do not accumulate), except `embedding_backward` and
the head weight gradient of `head_loss`, which add into the buffers they are given, because the
embeddings' gradient is a scatter and a tied head shares its weight with the token embedding. The
head can also write its buffer outright (`dw_fresh`), so a new gradient needs no zeroing pass.

Every backend subclasses `Backend`, whose methods are all abstract: a backend missing one cannot be
built (TypeError at instantiation, naming the method) instead of failing mid-run.
tests/test_backend_contract.py calls every method of every backend and dtype once against this
contract; `numpy_backend.NumpyBackend` is the reference implementation written to be read, and the
parity tests check every other backend's numbers against it.
"""
from abc import ABC, abstractmethod
from typing import Any, Sequence

Array = Any  # a backend's array type


class Backend(ABC):
    name: str    # "numpy", "numba", "torch"
    dtype: str   # "float32", "float64"; numba and torch also "bfloat16": bf16 matmuls, a float32 store
                 # (weights, gradients, optimizer state, the residual stream)

    # ---- array handling: the model touches neither numpy nor torch directly -----------------------
    @abstractmethod
    def from_numpy(self, x) -> Array: ...            # float arrays cast to the store dtype
    @abstractmethod
    def index(self, x) -> Array: ...                 # integer arrays (token ids, offsets)
    @abstractmethod
    def to_numpy(self, x): ...                       # any array -> np.ndarray (float64 stays float64,
                                                     # bfloat16 comes back float32)
    @abstractmethod
    def zeros_like(self, x) -> Array: ...
    @abstractmethod
    def empty_like(self, x) -> Array: ...            # uninitialised: for a buffer written before it is read
    @abstractmethod
    def add_(self, dst, src) -> None: ...            # dst += src in place (gradient accumulation)
    @abstractmethod
    def rng(self, seed: int): ...                    # a seeded RNG for init and dropout masks
    @abstractmethod
    def item(self, x) -> float: ...                  # a 0-d array -> Python float (a host sync)

    # ---- token + position embedding --------------------------------------------------------------
    @abstractmethod
    def embedding_forward(self, tokens, positions, wte, wpe) -> Array:
        """x[n] = wte[tokens[n]] + wpe[positions[n]]  -> (N, d)"""

    @abstractmethod
    def embedding_backward(self, dwte, dwpe, dx, tokens, positions) -> None:
        """Scatter-add: dwte[tokens[n]] += dx[n], dwpe[positions[n]] += dx[n] (in place)."""

    # ---- token embedding alone (the Llama family: positions enter by rotation, see rope_*) ---------
    @abstractmethod
    def token_embedding_forward(self, tokens, wte) -> Array:
        """x[n] = wte[tokens[n]]  -> (N, d)"""

    @abstractmethod
    def token_embedding_backward(self, dwte, dx, tokens) -> None:
        """Scatter-add: dwte[tokens[n]] += dx[n] (in place)."""

    # ---- layernorm (eps constants.LN_EPS, biased variance) ---------------------------------------
    @abstractmethod
    def layernorm_forward(self, x, w, b) -> tuple[Array, Array, Array]:
        """(N, d) -> out (N, d), mean (N,), rstd (N,); the last two are kept for the backward."""

    @abstractmethod
    def layernorm_backward(self, dout, x, w, mean, rstd, dskip=None) -> tuple[Array, Array, Array]:
        """-> dx (N, d), dw (d,), db (d,). dskip (N, d): the gradient x also gets by the residual's skip
        path, added into dx in the same pass (a pre-norm block's x feeds both)."""

    # ---- RMSNorm (the Llama family): out = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) ----------
    @abstractmethod
    def rmsnorm_forward(self, x, w, eps: float) -> tuple[Array, Array]:
        """(N, d) -> out (N, d), rstd (N,), kept for the backward."""

    @abstractmethod
    def rmsnorm_backward(self, dout, x, w, rstd, dskip=None) -> tuple[Array, Array]:
        """-> dx (N, d), dw (d,); dskip as for layernorm_backward."""

    # Per-head RMSNorm of the query and key heads of a fused qkv (Qwen3's q_norm and k_norm): every
    # head vector of width hd is normalised on its own, q heads scaled by wq (hd,), k heads by wk (hd,);
    # the value heads pass through unchanged.
    @abstractmethod
    def qk_norm_forward(self, qkv, wq, wk, eps: float, n_heads: int, n_kv_heads: int) -> tuple[Array, Array]:
        """qkv (N, W) -> out (N, W), rstd (N, H + Hkv)."""

    @abstractmethod
    def qk_norm_backward(self, dout, qkv, wq, wk, rstd, n_heads: int, n_kv_heads: int) -> tuple[Array, Array, Array]:
        """-> dqkv (N, W), dwq (hd,), dwk (hd,)."""

    # ---- rotary position embedding (RoPE) on the query and key heads of a fused qkv --------------
    # Each of the first n_rot heads (H query heads, then Hkv key heads) is split in halves x1, x2 of
    # width hd/2 (Hugging Face's rotate_half layout) and rotated by the angle positions[n] * inv_freq:
    #   out1 = x1 cos - x2 sin,  out2 = x2 cos + x1 sin       cos, sin: tables (C, hd/2) by position
    # The value heads pass through unchanged. A rotation's inverse is its transpose, the rotation by -θ.
    @abstractmethod
    def rope_forward(self, qkv, cos, sin, positions, n_rot: int) -> Array:
        """qkv (N, W), positions (N,) -> (N, W), a new array."""

    @abstractmethod
    def rope_backward(self, dout, cos, sin, positions, n_rot: int) -> Array:
        """dout (N, W) -> dqkv (N, W): dout rotated by -θ."""

    # ---- linear, Hugging Face Conv1D layout: y = x @ W + b, W is (in, out) -----------------------
    @abstractmethod
    def linear_forward(self, x, w, b) -> Array:
        """x (N, in), w (in, out), b (out,) or None -> (N, out)"""

    @abstractmethod
    def linear_backward(self, dy, x, w, need_dw: bool = True) -> tuple[Array, Array | None, Array]:
        """-> dx (N, in), dw (in, out) or None when need_dw is False (frozen weight), db (out,)"""

    # ---- LoRA: a low-rank update beside a frozen linear (minisft/lora.py) --------------------------
    # y[:, col:col+out] += u @ b with u = scale * (x @ a): x (N, in) is the adapter's input (after its
    # dropout), a (in, r), b (r, out). `col` places the update in a column slice of y, so one fused
    # c_attn (N, 3d) can carry separate q, k and v adapters. Both halves are matmuls of rank r.
    @abstractmethod
    def lora_forward(self, y, x, a, b, scale: float, col: int = 0) -> Array:
        """In place: y[:, col:col+out] += scale * (x @ a) @ b -> u = scale * (x @ a) (N, r), for the backward."""

    @abstractmethod
    def lora_backward(self, dy, x, u, a, b, scale: float, col: int = 0) -> tuple[Array, Array, Array]:
        """dy (N, >= col+out) -> dx (N, in), da (in, r), db (r, out), from the slice dy[:, col:col+out]."""

    # The output head's adapter: its up-projection u @ b runs inside head_loss (lora=...), so only the
    # down-projection is a kernel of its own.
    @abstractmethod
    def lora_down_forward(self, x, a, scale: float) -> Array:
        """x (N, in), a (in, r) -> u = scale * (x @ a) (N, r)"""

    @abstractmethod
    def lora_down_backward(self, du, x, a, scale: float) -> tuple[Array, Array]:
        """du (N, r) -> dx (N, in), da (in, r)"""

    # ---- causal multi-head attention over fused qkv, packed sequences ----------------------------
    # n_kv_heads None: as many key/value heads as query heads (GPT-2). Otherwise grouped-query
    # attention: each key/value head serves H // Hkv query heads, so its gradient sums over them.
    @abstractmethod
    def attention_forward(self, qkv, cu_seqlens, n_heads: int, max_seqlen: int,
                          n_kv_heads: int | None = None) -> tuple[Array, Any]:
        """qkv (N, W) = [q | k | v] -> out (N, H hd), ctx: whatever this backend's backward needs."""

    @abstractmethod
    def attention_backward(self, dout, qkv, out, ctx, cu_seqlens, n_heads: int, max_seqlen: int,
                           n_kv_heads: int | None = None) -> Array:
        """dout (N, H hd) -> dqkv (N, W)"""

    # ---- SwiGLU (the Llama family's MLP activation) over a fused [gate | up] ----------------------
    @abstractmethod
    def swiglu_forward(self, gu) -> Array:
        """gu (N, 2f) = [gate | up] -> silu(gate) * up (N, f), silu(g) = g * sigmoid(g)."""

    @abstractmethod
    def swiglu_backward(self, dy, gu) -> Array:
        """dy (N, f) -> dgu (N, 2f)."""

    # ---- GELU, tanh approximation ----------------------------------------------------------------
    @abstractmethod
    def gelu_forward(self, x) -> Array: ...
    @abstractmethod
    def gelu_backward(self, dy, x) -> Array: ...

    # ---- residual add ----------------------------------------------------------------------------
    @abstractmethod
    def residual_forward(self, a, b) -> Array: ...   # a + b
    @abstractmethod
    def residual_backward(self, dy) -> tuple[Array, Array]: ...  # the gradient flows to both inputs

    # ---- dropout (inverted: kept values scaled by 1/(1-p)) ---------------------------------------
    @abstractmethod
    def dropout_forward(self, x, p: float, rng) -> tuple[Array, Array]: ...  # -> y, mask (scale or 0)
    @abstractmethod
    def dropout_backward(self, dy, mask) -> Array: ...

    # ---- output head fused with cross-entropy ----------------------------------------------------
    @abstractmethod
    def head_loss(self, h, w, targets, dw=None, grad_scale: float = 1.0, need_dh: bool = False,
                  lora=None, dw_fresh: bool = False) -> tuple[Array, int, Array | None]:
        """h (N, d), w (V, d), targets (N,) with constants.IGNORE_INDEX ignored: a host (numpy) int array, as
        the model passes it, so a device backend finds and counts the valid rows without a device sync.

        Returns (loss_sum, n_valid, dh): the summed cross-entropy over valid targets (a 0-d array of
        float64 or of the store dtype),
        their count, and dh (N, d) = grad_scale * d(loss_sum)/dh. When dw (V, d) is given, the
        head weight gradient grad_scale * d(loss_sum)/dw is added into it (dw_fresh: written into
        it, whatever it held, as into a buffer from empty_like); when dw is None no
        gradient is computed at all (evaluation) and dh is None. Logits exist only for rows with a
        valid target, a chunk of rows at a time: the (N, V) matrix is never held.

        need_dh: compute dh even when dw is None (a frozen head: its dW matmul is skipped, the
        gradient still reaches the hidden states). lora = (u (N, r), b (r, V), du (N, r), db (r, V)):
        the head's adapter, logits += u @ b; its gradients go into the buffers du (rows written) and
        db (added into), scaled like dh.
        """

    @abstractmethod
    def head_logits(self, h, w) -> Array:
        """h (N, d), w (V, d) -> logits (N, V), for inference."""

    # ---- inference: rows, and the per-layer KV cache for incremental decoding (forward only) ------
    # Decoding keeps, per layer, the keys and values of every token seen so far: k_cache and
    # v_cache, each (S, Hkv, T, hd) for S sequences of at most T cached positions. Cache row s belongs
    # to sequence s; a prefill writes a packed batch of prompts at their positions 0..L-1 (the
    # attention itself is `attention_forward`), then each decode step feeds one new token per
    # sequence, written at position lens[s] - 1 and attending over cache positions [0, lens[s]).
    @abstractmethod
    def take_rows(self, x, rows) -> Array:
        """x[rows] along the first axis, any trailing shape: the last position of each packed sequence
        (N, d) -> (S, d), or the cache rows of the sequences still generating (S, H, T, hd) -> (S', H, T, hd)."""

    @property
    @abstractmethod
    def kv_dtype(self) -> Any: ...                   # the KV cache's element type (numpy or torch dtype;
                                                     # .itemsize = bytes per element)

    @abstractmethod
    def kv_cache_alloc(self, n_seqs: int, n_heads: int, max_len: int, head_dim: int) -> tuple[Array, Array]:
        """-> k_cache, v_cache, each (S, Hkv, T, hd) zeros of kv_dtype (n_heads: the key/value heads)."""

    @abstractmethod
    def kv_cache_write(self, k_cache, v_cache, qkv, seq_ids, positions) -> None:
        """qkv (N, W) = [q | k | v], Hkv and hd read off the cache; seq_ids, positions (N,). In place, for
        every row n and key/value head h: k_cache[seq_ids[n], h, positions[n]] = k[n, h] (and v alike).
        Rows never share a slot."""

    @abstractmethod
    def attention_decode(self, qkv, k_cache, v_cache, lens, n_heads: int, max_len: int) -> Array:
        """One new token per cache row: qkv (S, W), its own k/v already written at lens[s] - 1.
        Query s attends over cache positions [0, lens[s]) of row s -> out (S, H hd); query head h reads
        cache head h // (H // Hkv). lens (S,) index array, max_len = max(lens) as a Python int (a bound
        for the work, so no host sync is needed)."""

    # ---- optimizer -------------------------------------------------------------------------------
    @abstractmethod
    def adamw_step(self, p, g, m, v, lr: float, beta1: float, beta2: float, eps: float,
                   weight_decay: float, step: int) -> None:
        """One AdamW update of p in place (m, v updated too); step counts from 1 (bias correction)."""

    # ---- lean AdamW state (number formats: backends/quant.py; each --optim-state's arrays and kernel:
    # backends/optim_state.py): float32 master weights p, moments kept as flat (n,) arrays of bfloat16
    # or of 8-bit codes with one float32 scale per block of 2048 ----------------------------------
    @abstractmethod
    def optim_state_zeros(self, n: int, kind: str) -> Array:
        """n zeros of kind "bf16" (bfloat16), "u8" (uint8 codes) or "scale" (float32); their numpy form
        is optim_state.HOST_DTYPES[kind]."""

    @abstractmethod
    def optim_state_from_numpy(self, x) -> Array:
        """Exact: uint16 (bfloat16 bit patterns), uint8 or float32 numpy -> a state array."""

    @abstractmethod
    def optim_state_to_numpy(self, x):
        """The inverse: bfloat16 comes back as its uint16 bit patterns."""

    @abstractmethod
    def adamw_step_bf16(self, p, g, m, v, lr: float, beta1: float, beta2: float, eps: float,
                        weight_decay: float, step: int, key: int) -> None:
        """adamw_step's float32 arithmetic on bfloat16 m, v (n,): read exactly, written back rounded
        stochastically with the hash draws of quant.bf16_round (key numbers the tensor)."""

    @abstractmethod
    def adamw_step_8bit(self, p, g, qm, sm, qv, sv, lr: float, beta1: float, beta2: float, eps: float,
                        weight_decay: float, step: int) -> None:
        """adamw_step on block-quantized moments: qm, qv (n,) uint8 codes of m and sqrt(v), sm, sv
        (n_blocks,) their scales. Per block: dequantize, update in float32, requantize (quant.quantize)."""

    @abstractmethod
    def global_norm(self, grads: Sequence[Array]) -> float:
        """sqrt(sum of squares over every tensor), a Python float."""

    @abstractmethod
    def scale_(self, grads: Sequence[Array], s: float) -> None:
        """Multiply every tensor by s in place (gradient clipping)."""
