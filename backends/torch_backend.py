"""The torch backend: the numpy reference's kernels on torch tensors, on the CPU, CUDA or Apple MPS.

The math is the hand-written forward and backward of backends/numpy_backend.py; torch supplies the
arithmetic, never autograd (no tensor here requires grad and every kernel runs under no_grad).
Where torch has a fused kernel for one step of that math, it is used behind a check:

    attention   CUDA: torch's varlen flash (bfloat16) or memory-efficient (float32) kernels, which
                take the packed layout as it is (cu_seqlens), forward and backward.
                CPU: torch's CPU flash kernel on the batch padded to (S, H, max_seqlen, hd).
                Anything else (float64 on CUDA, MPS, an op missing or changed): "padded-math",
                our own softmax attention on the padded batch, always correct.
                Every op's schema is checked at import; `attention_options` says which path can
                run here and why the others cannot, `TorchBackend.attention_path` which one runs.
                Grouped-query attention (the Llama family): the flash kernels (CUDA varlen, and the
                CPU one where `cpu_flash_gqa_problem` finds it able) take the Hkv key/value heads as
                they are; the memory-efficient kernel and padded-math get each one repeated for its
                group of query heads (`expand_kv`) and sum the group's gradients back (`sum_groups`).
    layernorm   torch.native_layer_norm and its backward (the mean/rstd the interface keeps).
    GELU        F.gelu(approximate="tanh") and aten.gelu_backward: the same formula, one kernel each.
    AdamW       torch._fused_adamw_ (one kernel per tensor) where this torch has it for the device,
                else the numpy backend's sequence of in-place ops.

dtype "bfloat16" is mixed precision: parameters, gradients, AdamW moments and the residual stream
stay float32 (the "store" dtype); matmuls and attention run in bfloat16 (the "compute" dtype), except
the padded attention paths: padded-math always, and torch's CPU flash kernel while a batch's longest
sequence has at most CPU_FLASH_F32_MAX_LEN tokens, take their bfloat16 inputs in float32 (the flash
kernel measured faster there in float32 on a CPU without AMX); layernorm and RMSNorm statistics,
softmax/cross-entropy and every reduction run in float32. The elementwise Llama kernels on bfloat16
activations (q/k norm, RoPE, SwiGLU) compute in float32 and round their result to bfloat16 once.

Host syncs: a step moves its batch to the device once (`index` copies from pinned memory without
waiting for the device) and reads back only the loss (`item`). `head_loss` takes the targets as a
host array, so the valid rows are found and counted without asking the device. Dropout masks come
from the model's numpy RNG: on the CPU drawn in numpy (the numpy backend's masks bit for bit); on a
GPU the numpy RNG seeds a device generator, because drawing N x d numbers on the host and copying
them over would cost more than the step's matmuls. Either way a saved RNG state replays the masks.
"""
import functools
import math
import weakref

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:
    raise ImportError("the torch backend needs PyTorch, which is not installed: "
                      "pip install 'minisft[torch]' (or a torch build for your GPU from pytorch.org)") from e

from . import heap, quant
from .constants import IGNORE_INDEX, LN_EPS
from .interface import Backend

# dtype name -> (store dtype: parameters, gradients, optimizer state, residual stream;
#                compute dtype: matmul and attention inputs and outputs)
DTYPES = {"float32": (torch.float32, torch.float32),
          "float64": (torch.float64, torch.float64),
          "bfloat16": (torch.float32, torch.bfloat16)}
# Rows of logits materialised at once in the fused head: 512 x 50257 x 4 B = 103 MB on the CPU, where
# each chunk also adds its (V, d) weight-gradient product into dw (measured on gpt2-small, one thread,
# bfloat16: 128 rows 531 ms, 256 rows 384 ms, 512 rows 299 ms for 512 rows); a GPU needs bigger
# matmuls to be busy: 2048 rows = 412 MB.
HEAD_CHUNK_ROWS = {"cpu": 512, "cuda": 2048, "mps": 1024}
# torch's CPU flash attention on bfloat16 inputs runs in float32 while the batch's longest sequence
# has at most this many tokens. tools/attention_dtype.py on an AMD EPYC without AMX (AVX512_BF16, 2
# threads, 12 heads of 64, attention_forward + attention_backward, casts included): bfloat16 takes
# 2.4-2.6x float32's time at 8 x 64 tokens, 1.2x at 2 x 256, 1.0x at 2 x 384, 0.8x at 2 x 512, where
# its bfloat16 matmuls start to pay. Not measured on a CPU with AMX.
CPU_FLASH_F32_MAX_LEN = 384
# The lean optimizer state's tensors (bfloat16 moments held as bfloat16; numpy sees their uint16 bits).
LEAN_DTYPES = {"bf16": torch.bfloat16, "u8": torch.uint8, "scale": torch.float32}
LEAN_CHUNK = 512 * quant.BLOCK  # elements per pass of the lean AdamW: bounds its float32 temporaries to 4 MB each
# In order of preference; the first that can run is used.
ATTENTION_PATHS = ("flash-varlen", "efficient-varlen", "cpu-flash-padded", "padded-math")


# ---- which fused ops this torch has, checked once at import ----------------------------------------
def _op_problem(name, positional, keywords, n_returns):
    """None when torch.ops.aten.<name> takes these leading positional arguments and these keyword
    arguments (every other one defaulted) and returns n_returns values, else what is wrong."""
    packet = getattr(torch.ops.aten, name, None)
    if packet is None or "default" not in packet.overloads():
        return f"torch {torch.__version__} has no aten.{name}"
    schema = packet.default._schema
    names = [a.name for a in schema.arguments]
    if names[:len(positional)] != list(positional):
        return f"aten.{name} has another signature in torch {torch.__version__}: {schema}"
    rest = schema.arguments[len(positional):]
    unknown = [k for k in keywords if k not in names[len(positional):]]
    required = [a.name for a in rest if a.name not in keywords and not a.has_default_value()]
    if unknown or required or len(schema.returns) != n_returns:
        return f"aten.{name} has another signature in torch {torch.__version__}: {schema}"
    return None


def _first_problem(*problems):
    return next((p for p in problems if p), None)


FLASH_FWD_ARGS = ("query", "key", "value", "cum_seq_q", "cum_seq_k", "max_q", "max_k", "dropout_p",
                  "is_causal", "return_debug_mask")
FLASH_BWD_ARGS = ("grad_out", "query", "key", "value", "out", "logsumexp", "cum_seq_q", "cum_seq_k",
                  "max_q", "max_k", "dropout_p", "is_causal", "rng_state", "unused")
EFF_FWD_ARGS = ("query", "key", "value", "bias", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                "max_seqlen_k", "dropout_p", "custom_mask_type", "compute_log_sumexp")
EFF_BWD_ARGS = ("grad_out_", "query", "key", "value", "bias", "out", "cu_seqlens_q", "cu_seqlens_k",
                "max_seqlen_q", "max_seqlen_k", "logsumexp", "dropout_p", "philox_seed", "philox_offset",
                "custom_mask_type", "bias_requires_grad")
CPU_FWD_ARGS = ("query", "key", "value", "dropout_p", "is_causal")
CPU_BWD_ARGS = ("grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p", "is_causal")
ADAMW_ARGS = ("self", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")
ADAMW_KW = ("lr", "beta1", "beta2", "weight_decay", "eps", "amsgrad", "maximize")

_flash_built = getattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)()
OP_PROBLEMS = {
    "flash-varlen": _first_problem(
        None if _flash_built else f"torch {torch.__version__} was built without flash attention",
        _op_problem("_flash_attention_forward", FLASH_FWD_ARGS, ("scale",), 5),
        _op_problem("_flash_attention_backward", FLASH_BWD_ARGS, ("scale",), 3)),
    "efficient-varlen": _first_problem(
        _op_problem("_efficient_attention_forward", EFF_FWD_ARGS, ("scale",), 6),
        _op_problem("_efficient_attention_backward", EFF_BWD_ARGS, ("scale",), 4)),
    "cpu-flash-padded": _first_problem(
        _op_problem("_scaled_dot_product_flash_attention_for_cpu", CPU_FWD_ARGS, ("scale",), 2),
        _op_problem("_scaled_dot_product_flash_attention_for_cpu_backward", CPU_BWD_ARGS, ("scale",), 3)),
    "fused-adamw": _op_problem("_fused_adamw_", ADAMW_ARGS, ADAMW_KW, 0),
}


def attention_options(device_type, dtype, head_dim, capability=None, problems=OP_PROBLEMS) -> dict:
    """Attention path -> None when it can run for this device type ("cpu", "cuda", "mps"), compute
    dtype and head size (capability: the CUDA compute capability), else why it cannot."""
    why = {}
    if device_type != "cuda":
        why["flash-varlen"] = "CUDA only"
    elif problems["flash-varlen"]:
        why["flash-varlen"] = problems["flash-varlen"]
    elif dtype != torch.bfloat16:
        why["flash-varlen"] = f"needs bfloat16 (dtype='bfloat16'), not {dtype}"
    elif capability is None or capability < (8, 0):
        why["flash-varlen"] = f"needs compute capability 8.0 or newer, this GPU has {capability}"
    elif head_dim % 8 or head_dim > 256:
        why["flash-varlen"] = f"needs a head size that is a multiple of 8 up to 256, not {head_dim}"
    else:
        why["flash-varlen"] = None

    align = 4 if dtype == torch.float32 else 8  # the kernels load 16 bytes at a time
    if device_type != "cuda":
        why["efficient-varlen"] = "CUDA only"
    elif problems["efficient-varlen"]:
        why["efficient-varlen"] = problems["efficient-varlen"]
    elif dtype not in (torch.float32, torch.bfloat16):
        why["efficient-varlen"] = f"needs float32 or bfloat16, not {dtype}"
    elif head_dim % align:
        why["efficient-varlen"] = f"needs a head size that is a multiple of {align}, not {head_dim}"
    else:
        why["efficient-varlen"] = None

    if device_type != "cpu":
        why["cpu-flash-padded"] = "CPU only"
    else:
        why["cpu-flash-padded"] = problems["cpu-flash-padded"]

    why["padded-math"] = None
    return why


# ---- grouped-query attention: key/value heads shared by groups of query heads ----------------------
def expand_kv(t, group, dim):
    """Each key/value head repeated for the `group` query heads it serves (query head h reads kv head
    h // group), along the head axis dim: for a kernel that wants as many kv heads as query heads."""
    return t if group == 1 else t.repeat_interleave(group, dim=dim)


def sum_groups(dt, group, dim):
    """Undoes expand_kv for a gradient: each kv head fed `group` query heads, so its gradient is the
    sum of theirs (head axis dim: H -> Hkv)."""
    return dt if group == 1 else dt.unflatten(dim, (-1, group)).sum(dim + 1)


# ---- attention on the packed layout, CUDA: torch's varlen kernels ---------------------------------
def _split_qkv(qkv, n_heads, n_kv_heads):
    """qkv (N, W) -> q (N, H, hd), k and v (N, Hkv, hd), contiguous as the fused kernels want."""
    N = qkv.shape[0]
    heads = qkv.view(N, n_heads + 2 * n_kv_heads, -1)         # (N, H + 2 Hkv, hd)
    return [t.contiguous() for t in heads.split((n_heads, n_kv_heads, n_kv_heads), dim=1)]


def flash_varlen_forward(qkv, cu32, n_heads, max_seqlen, scale, n_kv_heads=None):
    """qkv (N, W), cu32 (S+1,) int32 -> out (N, H hd), what the backward needs. The flash kernel takes
    grouped heads as they are (k, v with Hkv heads) and sums their gradients itself."""
    q, k, v = _split_qkv(qkv, n_heads, n_kv_heads or n_heads)
    out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu32, cu32, max_seqlen, max_seqlen, 0.0, True, False, scale=scale)
    return out.reshape(qkv.shape[0], -1), (lse, rng_state, unused)


def flash_varlen_backward(dout, qkv, out, saved, cu32, n_heads, max_seqlen, scale, n_kv_heads=None):
    """-> dqkv (N, W)"""
    lse, rng_state, unused = saved
    N = qkv.shape[0]
    q, k, v = _split_qkv(qkv, n_heads, n_kv_heads or n_heads)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout.reshape(N, n_heads, -1).contiguous(), q, k, v, out.reshape(N, n_heads, -1).contiguous(),
        lse, cu32, cu32, max_seqlen, max_seqlen, 0.0, True, rng_state, unused, scale=scale)
    return torch.cat((dq, dk, dv), 1).reshape(N, -1)          # (N, H + 2 Hkv, hd) -> (N, W)


CAUSAL_FROM_TOP_LEFT = 1  # the memory-efficient kernel's custom_mask_type for ordinary causal attention


def efficient_varlen_forward(qkv, cu32, n_heads, max_seqlen, scale, n_kv_heads=None):
    """As flash_varlen_forward; the kernel wants a batch of one (1, N, H, hd) when given cu_seqlens,
    and as many key/value heads as query heads, so grouped ones are expanded (expand_kv)."""
    q, k, v = _split_qkv(qkv, n_heads, n_kv_heads or n_heads)
    group = n_heads // k.shape[1]
    q, k, v = q[None], expand_kv(k, group, 1)[None], expand_kv(v, group, 1)[None]  # (1, N, H, hd) each
    out, lse, seed, offset, max_q, max_k = torch.ops.aten._efficient_attention_forward(
        q, k, v, None, cu32, cu32, max_seqlen, max_seqlen, 0.0, CAUSAL_FROM_TOP_LEFT, True, scale=scale)
    return out.reshape(qkv.shape[0], -1), (lse, seed, offset, max_q, max_k)


def efficient_varlen_backward(dout, qkv, out, saved, cu32, n_heads, max_seqlen, scale, n_kv_heads=None):
    lse, seed, offset, max_q, max_k = saved
    N = qkv.shape[0]
    q, k, v = _split_qkv(qkv, n_heads, n_kv_heads or n_heads)
    group = n_heads // k.shape[1]
    # the forward's expansion again (a copy of k and v is cheaper to remake than to keep)
    q, k, v = q[None], expand_kv(k, group, 1)[None], expand_kv(v, group, 1)[None]  # (1, N, H, hd) each
    dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(
        dout.reshape(1, N, n_heads, -1).contiguous(), q, k, v, None,
        out.reshape(1, N, n_heads, -1).contiguous(), cu32, cu32, max_q, max_k, lse, 0.0, seed, offset,
        CAUSAL_FROM_TOP_LEFT, False, scale=scale)
    # forward: k, v = expand_kv(k), expand_kv(v), so each kv head's gradient sums over its group
    dk, dv = sum_groups(dk[0], group, 1), sum_groups(dv[0], group, 1)  # (N, Hkv, hd) each
    return torch.cat((dq[0], dk, dv), 1).reshape(N, -1)       # (N, H + 2 Hkv, hd) -> (N, W)


# ---- attention on the batch padded to (S, max_seqlen): the CPU kernel and the always-correct math --
def pad_index(cu, n, max_seqlen):
    """Row of each packed position in the padded (S * max_seqlen) layout, or None when every sequence
    is max_seqlen long (then the packed rows already are that layout). Computed on the device from
    cu_seqlens, so no host sync."""
    S = cu.shape[0] - 1
    if n == S * max_seqlen:
        return None
    pos = torch.arange(n, device=cu.device)                   # (N,)
    seq = torch.searchsorted(cu[1:], pos, right=True)         # (N,) sequence of each position
    return seq * max_seqlen + pos - cu[seq]                   # (N,) seq * L + position in seq


def to_padded(x, idx, S, L):
    """(N, w) packed rows -> (S, L, w); padding rows are 0. Right padding is harmless to causal
    attention: a real query never looks at a later (padded) key."""
    if idx is None:
        return x.view(S, L, -1)
    out = x.new_zeros(S * L, x.shape[1])
    out.index_copy_(0, idx, x)
    return out.view(S, L, -1)


def from_padded(x, idx):
    """(S * L, w) -> (N, w), dropping the padding rows."""
    return x if idx is None else x.index_select(0, idx)


def padded_heads(x, idx, S, L, n_heads):
    """(N, H hd) packed, an output or its gradient -> (S, H, L, hd) padded."""
    return to_padded(x, idx, S, L).view(S, L, n_heads, -1).transpose(1, 2)


def padded_qkv(qkv, idx, S, L, n_heads, n_kv_heads):
    """(N, W) packed -> q (S, H, L, hd), k and v (S, Hkv, L, hd) padded."""
    heads = to_padded(qkv, idx, S, L).view(S, L, n_heads + 2 * n_kv_heads, -1).transpose(1, 2)  # (S, H + 2 Hkv, L, hd)
    return heads.split((n_heads, n_kv_heads, n_kv_heads), dim=1)


def merge_heads(o, idx):
    """(S, H, L, hd) -> (N, d): heads side by side, padding rows dropped."""
    S, H, L, hd = o.shape
    return from_padded(o.transpose(1, 2).reshape(S * L, H * hd), idx)


def math_attention_forward(q, k, v, scale):
    """q, k, v (S, H, L, hd) -> o (S, H, L, hd), lse (S, H, L): the numpy backend's softmax
    attention, keeping the log-sum-exp instead of the probabilities (L x L per head)."""
    L = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale                                   # (S, H, L, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()          # key j <= query i
    scores.masked_fill_(~causal, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                         # (S, H, L)
    return torch.exp(scores - lse[..., None]) @ v, lse


def math_attention_backward(do, q, k, v, lse, scale):
    """do (S, H, L, hd) -> dq, dk, dv; the probabilities are recomputed from q, k and lse."""
    L = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale                                   # (S, H, L, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    p = torch.exp(scores.masked_fill_(~causal, float("-inf")) - lse[..., None])  # (S, H, L, L)
    dv = p.transpose(-1, -2) @ do                                                 # (S, H, L, hd)
    dp = do @ v.transpose(-1, -2)                                                 # (S, H, L, L)
    # softmax backward, row by row: dscores = p * (dp - sum_j(dp * p))
    dscores = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale                  # (S, H, L, L)
    return dscores @ k, dscores.transpose(-1, -2) @ q, dv


# ---- the backend --------------------------------------------------------------------------------------
def resolve_device(name) -> "torch.device":
    """A torch.device for "cpu", "cuda", "cuda:N" or "mps", or a ValueError saying why it cannot be used."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown torch device {name!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support (install a CUDA build from pytorch.org)"
                   if torch.version.cuda is None else "no usable NVIDIA GPU or driver was found")
            raise ValueError(f"device {name!r}: CUDA is not available: {why} (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {name!r}: MPS is not available (it needs Apple silicon, macOS 12.3+ "
                             f"and a torch build with MPS; torch {torch.__version__})")
    elif dev.type != "cpu":
        raise ValueError(f"device {name!r}: the torch backend runs on cpu, cuda or mps")
    return dev


def _fused_adamw_problem(device, dtype):
    """None when torch._fused_adamw_ runs for this device and dtype, else why not. The op exists in
    more torch versions than its CPU/MPS kernels, so one tiny update is tried."""
    if OP_PROBLEMS["fused-adamw"]:
        return OP_PROBLEMS["fused-adamw"]
    p, g, m, v = (torch.ones(1, dtype=dtype, device=device) for _ in range(4))
    try:
        torch._fused_adamw_([p], [g], [m], [v], [], [torch.ones((), device=device)], lr=1e-3, beta1=0.9,
                            beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    except (RuntimeError, NotImplementedError) as e:
        return f"torch._fused_adamw_ cannot run on {device.type} {dtype}: {str(e).splitlines()[0]}"
    return None


@functools.cache
def cpu_flash_gqa_problem():
    """None when torch's CPU flash kernel takes grouped heads as they are (k, v with fewer heads than
    q) and returns each kv head's summed gradient, else why not: then expand_kv feeds it as many kv
    heads as query heads. Not every torch the project allows has that, so one tiny case is run both
    ways and compared (float64: the two ways differ only by summation order)."""
    if OP_PROBLEMS["cpu-flash-padded"]:
        return OP_PROBLEMS["cpu-flash-padded"]
    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    gen = torch.Generator().manual_seed(0)
    q, do = (torch.randn(1, 2, 3, 4, generator=gen, dtype=torch.float64) for _ in range(2))  # (S, H, L, hd)
    k, v = (torch.randn(1, 1, 3, 4, generator=gen, dtype=torch.float64) for _ in range(2))   # (S, Hkv, L, hd)
    try:
        o, lse = fwd(q, k, v, 0.0, True, scale=0.5)
        grads = bwd(do, q, k, v, o, lse, 0.0, True, scale=0.5)
    except (RuntimeError, NotImplementedError) as e:
        return f"torch {torch.__version__}'s CPU flash attention takes no grouped heads: {str(e).splitlines()[0]}"
    ke, ve = expand_kv(k, 2, 1), expand_kv(v, 2, 1)                                           # (S, H, L, hd)
    oe, lse_e = fwd(q, ke, ve, 0.0, True, scale=0.5)
    dq, dk, dv = bwd(do, q, ke, ve, oe, lse_e, 0.0, True, scale=0.5)
    want = (oe, dq, sum_groups(dk, 2, 1), sum_groups(dv, 2, 1))
    if any(a.shape != b.shape or not torch.allclose(a, b) for a, b in zip((o, *grads), want)):
        return f"torch {torch.__version__}'s CPU flash attention on grouped heads differs from the expanded heads"
    return None


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, dtype="float32", device="cpu", attention=None):
        """attention: None picks the fastest attention path that can run here; a name from
        ATTENTION_PATHS forces that one (tests; a way around a misbehaving fused kernel)."""
        if dtype not in DTYPES:
            raise ValueError(f"torch backend supports {', '.join(DTYPES)}, not {dtype!r}")
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            heap.keep_freed_memory()  # torch's CPU tensors come from glibc's malloc (backends/heap.py)
        if self.device.type == "mps" and dtype == "float64":
            raise ValueError("MPS has no float64: use dtype float32 or bfloat16 on mps")
        if attention is not None and attention not in ATTENTION_PATHS:
            raise ValueError(f"unknown attention path {attention!r}; choose one of {', '.join(ATTENTION_PATHS)}")
        self.dtype = dtype
        self.store, self.compute = DTYPES[dtype]
        self.attention = attention
        self.head_chunk_rows = HEAD_CHUNK_ROWS[self.device.type]
        self.host_masks = self.device.type == "cpu"  # dropout masks drawn in numpy (see the module doc)
        self.adamw_problem = _fused_adamw_problem(self.device, self.store)
        self._paths = {}            # head size -> (attention path, why)
        self._generator = None      # device generator for dropout masks, seeded from the numpy RNG
        self._step = (None, None)   # (step, float32 tensor on the device) the fused AdamW reads
        self._wc = {}               # bfloat16: id(weight) -> (weakref to it, its compute-dtype copy)

    def attention_path(self, head_dim: int) -> tuple[str, str]:
        """(path, why) for this backend's device, dtype and a head size."""
        if head_dim not in self._paths:
            cap = torch.cuda.get_device_capability(self.device) if self.device.type == "cuda" else None
            why = attention_options(self.device.type, self.compute, head_dim, cap)
            if self.attention is not None:
                if why[self.attention]:
                    raise ValueError(f"attention path {self.attention!r} cannot run on {self.device} "
                                     f"{self.dtype}: {why[self.attention]}")
                path, reason = self.attention, "forced by TorchBackend(attention=...)"
            else:
                path = next(p for p in ATTENTION_PATHS if why[p] is None)
                skipped = [f"{p}: {why[p]}" for p in ATTENTION_PATHS[:ATTENTION_PATHS.index(path)]]
                reason = "fastest that can run here" + (" (skipped " + "; ".join(skipped) + ")" if skipped else "")
            self._paths[head_dim] = (path, reason)
        return self._paths[head_dim]

    # ---- array handling ------------------------------------------------------------------------
    def from_numpy(self, x):
        return torch.tensor(np.asarray(x), dtype=self.store, device=self.device)  # always a copy

    def index(self, x):
        x = np.ascontiguousarray(x, dtype=np.int64)
        if self.device.type == "cpu":
            return torch.from_numpy(x if x.flags.writeable else x.copy())  # shares the host memory
        t = torch.from_numpy(x)
        if self.device.type == "cuda":
            # From pinned memory the copy is queued on the stream without waiting for the device.
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def to_numpy(self, x):
        x = x.detach()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.to("cpu", copy=True).numpy()

    def zeros_like(self, x):
        return torch.zeros_like(x)

    def empty_like(self, x):
        return torch.empty_like(x)

    def rng(self, seed):
        return np.random.default_rng(seed)

    def item(self, x):
        return float(x.item())

    @torch.no_grad()
    def add_(self, dst, src):
        dst.add_(src)

    # ---- token + position embedding ------------------------------------------------------------
    @torch.no_grad()
    def embedding_forward(self, tokens, positions, wte, wpe):
        return wte.index_select(0, tokens) + wpe.index_select(0, positions)  # (N, d) store dtype

    @torch.no_grad()
    def embedding_backward(self, dwte, dwpe, dx, tokens, positions):
        dx = dx.to(dwte.dtype)
        dwte.index_add_(0, tokens, dx)    # scatter-ADD: repeated tokens accumulate
        dwpe.index_add_(0, positions, dx)

    # ---- token embedding alone (the Llama family) --------------------------------------------------
    @torch.no_grad()
    def token_embedding_forward(self, tokens, wte):
        return wte.index_select(0, tokens)                        # (N, d) store dtype: the residual stream

    @torch.no_grad()
    def token_embedding_backward(self, dwte, dx, tokens):
        dwte.index_add_(0, tokens, dx.to(dwte.dtype))             # scatter-ADD: repeated tokens accumulate

    # ---- layernorm: statistics in the store dtype (float32 under bfloat16) -----------------------
    @torch.no_grad()
    def layernorm_forward(self, x, w, b):
        N, d = x.shape
        out, mean, rstd = torch.native_layer_norm(x.to(self.store), (d,), w, b, LN_EPS)  # mean (N, 1)
        return out.to(self.compute), mean.view(N), rstd.view(N)

    @torch.no_grad()
    def layernorm_backward(self, dout, x, w, mean, rstd, dskip=None):
        N, d = x.shape
        dout = dout.to(self.store)
        dx, dw, _ = torch.ops.aten.native_layer_norm_backward(
            dout, x.to(self.store), (d,), mean.view(N, 1), rstd.view(N, 1), w, None, [True, True, False])
        if dskip is not None:
            dx.add_(dskip)                                        # the skip path's gradient, in place
        return dx, dw, dout.sum(0)

    # ---- RMSNorm and the per-head q/k norm: statistics in the store dtype, as layernorm's ----------
    @torch.no_grad()
    def rmsnorm_forward(self, x, w, eps):
        x = x.to(self.store)                                      # (N, d) the residual stream
        rstd = torch.rsqrt(x.square().mean(-1) + eps)             # (N,) no centring, unlike layernorm
        return (x * rstd[:, None] * w).to(self.compute), rstd     # (N, d) rounded once to the compute dtype

    @torch.no_grad()
    def rmsnorm_backward(self, dout, x, w, rstd, dskip=None):
        x, dout = x.to(self.store), dout.to(self.store)           # (N, d) each
        xhat = x * rstd[:, None]                                  # (N, d) recomputed from the forward's rstd
        # forward: out = xhat * w
        dw = (dout * xhat).sum(0)                                 # (d,)
        dxhat = dout * w                                          # (N, d)
        # forward: xhat = x * rstd, rstd = (mean(x^2) + eps)^(-1/2):
        #   dx = rstd * (dxhat - xhat * mean(dxhat * xhat))     (numpy_backend derives it)
        dx = rstd[:, None] * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))  # (N, d)
        if dskip is not None:
            dx.add_(dskip)                                        # the skip path's gradient, in place
        return dx, dw

    @torch.no_grad()
    def qk_norm_forward(self, qkv, wq, wk, eps, n_heads, n_kv_heads):
        N, W = qkv.shape
        hd, nq = wq.shape[0], n_heads + n_kv_heads
        qk = qkv.view(N, W // hd, hd)[:, :nq].to(self.store)      # (N, H + Hkv, hd) the q and k heads
        w = torch.cat([wq.expand(n_heads, hd), wk.expand(n_kv_heads, hd)])  # (H + Hkv, hd)
        rstd = torch.rsqrt(qk.square().mean(-1) + eps)            # (N, H + Hkv) one per head vector
        out = qkv.clone()                                         # (N, W) the value heads as they were
        out.view(N, W // hd, hd)[:, :nq] = qk * rstd[..., None] * w  # rounded once to qkv's dtype
        return out, rstd

    @torch.no_grad()
    def qk_norm_backward(self, dout, qkv, wq, wk, rstd, n_heads, n_kv_heads):
        N, W = qkv.shape
        hd, nq = wq.shape[0], n_heads + n_kv_heads
        qk = qkv.view(N, W // hd, hd)[:, :nq].to(self.store)      # (N, H + Hkv, hd)
        dqk = dout.view(N, W // hd, hd)[:, :nq].to(self.store)    # (N, H + Hkv, hd)
        xhat = qk * rstd[..., None]                               # (N, H + Hkv, hd)
        w = torch.cat([wq.expand(n_heads, hd), wk.expand(n_kv_heads, hd)])  # (H + Hkv, hd)
        # forward: out = xhat * w per head vector, wq shared by the H query heads, wk by the Hkv key heads
        dwh = (dqk * xhat).sum(0)                                 # (H + Hkv, hd)
        dxhat = dqk * w                                           # (N, H + Hkv, hd)
        dqkv = dout.to(qkv.dtype, copy=True)                      # (N, W) the value heads pass through
        # forward: xhat = x * rstd, as rmsnorm_backward, per head vector
        dqkv.view(N, W // hd, hd)[:, :nq] = rstd[..., None] * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        return dqkv, dwh[:n_heads].sum(0), dwh[n_heads:].sum(0)

    # ---- rotary position embedding: the rotation in the store dtype, rounded once -----------------
    def _rotate(self, x, cos, sin, positions, n_rot, sign):
        """The first n_rot heads of x (N, W) rotated by sign * positions[n] * inv_freq, a new array;
        sign -1 is the inverse rotation (sin negated), without negating the whole (C, hd/2) table."""
        N, W = x.shape
        half = cos.shape[1]                                       # hd / 2
        heads = x.view(N, W // (2 * half), 2 * half)[:, :n_rot]   # (N, n_rot, hd)
        x1, x2 = heads[..., :half].to(self.store), heads[..., half:].to(self.store)  # (N, n_rot, hd/2) each
        c = cos.index_select(0, positions).to(self.store)[:, None]  # (N, 1, hd/2) each row's angles
        s = sin.index_select(0, positions).to(self.store)[:, None] * sign
        out = x.clone()                                           # (N, W) the value heads as they were
        rot = out.view(N, W // (2 * half), 2 * half)[:, :n_rot]   # (N, n_rot, hd) a view into out
        rot[..., :half] = x1 * c - x2 * s                         # out1 = x1 cos - x2 sin
        rot[..., half:] = x2 * c + x1 * s                         # out2 = x2 cos + x1 sin
        return out

    @torch.no_grad()
    def rope_forward(self, qkv, cos, sin, positions, n_rot):
        return self._rotate(qkv, cos, sin, positions, n_rot, 1.0)

    @torch.no_grad()
    def rope_backward(self, dout, cos, sin, positions, n_rot):
        # forward: [out1; out2] = R(θ) [x1; x2] with R = [[cos, -sin], [sin, cos]], so dx = R(θ)^T dout
        # = R(-θ) dout: the forward's rotation with sin negated
        return self._rotate(dout, cos, sin, positions, n_rot, -1.0)

    def _weight(self, w):
        """w in the compute dtype. Under bfloat16 the copy is made on first use and reused by every
        matmul until the AdamW step that updates w drops it (as the numba backend's bf16 copies:
        weights change only through adamw_step, or are new tensors), instead of a cast at each use."""
        if w.dtype == self.compute:
            return w
        entry = self._wc.get(id(w))
        if entry is None or entry[0]() is not w:
            entry = (weakref.ref(w), w.to(self.compute))
            self._wc[id(w)] = entry
            weakref.finalize(w, self._wc.pop, id(w), None)
        return entry[1]

    # ---- linear (Conv1D layout: w is (in, out)); matmuls in the compute dtype ---------------------
    @torch.no_grad()
    def linear_forward(self, x, w, b):
        x, w = x.to(self.compute), self._weight(w)
        if b is None:
            return x @ w                                          # (N, out)
        return torch.addmm(b.to(self.compute), x, w)

    @torch.no_grad()
    def linear_backward(self, dy, x, w, need_dw=True):
        dyc = dy.to(self.compute)
        dx = dyc @ self._weight(w).T                              # (N, in)
        dw = (x.to(self.compute).T @ dyc).to(self.store) if need_dw else None  # (in, out)
        db = dy.sum(0, dtype=self.store)                          # (out,)
        return dx, dw, db

    # ---- LoRA: y[:, col:col+out] += scale * (x @ a) @ b; matmuls in the compute dtype ------------
    @torch.no_grad()
    def lora_forward(self, y, x, a, b, scale, col=0):
        u = self.lora_down_forward(x, a, scale)                   # (N, r) compute dtype
        y[:, col:col + b.shape[1]].add_((u @ b.to(self.compute)).to(y.dtype))  # (N, out) in place
        return u

    @torch.no_grad()
    def lora_backward(self, dy, x, u, a, b, scale, col=0):
        # undoes y[:, col:col+out] += u @ b
        dys = dy[:, col:col + b.shape[1]].to(self.compute)        # (N, out)
        db = (u.T @ dys).to(self.store)                           # (r, out)
        dx, da = self.lora_down_backward(dys @ b.to(self.compute).T, x, a, scale)  # du (N, r)
        return dx, da, db

    @torch.no_grad()
    def lora_down_forward(self, x, a, scale):
        return (x.to(self.compute) @ a.to(self.compute)).mul_(scale)  # (N, r)

    @torch.no_grad()
    def lora_down_backward(self, du, x, a, scale):
        # undoes u = (x @ a) * scale
        dxa = du.to(self.compute) * scale                         # (N, r)
        dx = dxa @ a.to(self.compute).T                           # (N, in)
        da = (x.to(self.compute).T @ dxa).to(self.store)          # (in, r)
        return dx, da

    # ---- causal self-attention over packed sequences ---------------------------------------------
    def _padded_dtype(self, path, max_seqlen):
        """The dtype a padded path computes in. padded-math: the store dtype (float32 under bfloat16),
        at any length. torch's CPU flash kernel: float32 too while max_seqlen <= CPU_FLASH_F32_MAX_LEN,
        where its bfloat16 variant is the slower one (and the forward's bf16 output is then float32
        attention rounded once)."""
        if path == "cpu-flash-padded" and max_seqlen > CPU_FLASH_F32_MAX_LEN:
            return self.compute
        return self.store

    def _padded_group(self, path, n_heads, n_kv_heads):
        """How many times a padded path must repeat each key/value head (expand_kv): 1 where its
        kernel takes grouped heads itself (torch's CPU flash kernel, where cpu_flash_gqa_problem
        finds none), else H // Hkv. padded-math always expands: the simplest correct code."""
        if path == "cpu-flash-padded" and cpu_flash_gqa_problem() is None:
            return 1
        return n_heads // n_kv_heads

    @torch.no_grad()
    def attention_forward(self, qkv, cu_seqlens, n_heads, max_seqlen, n_kv_heads=None):
        Hkv = n_kv_heads or n_heads
        N, W = qkv.shape
        hd = W // (n_heads + 2 * Hkv)
        scale = 1.0 / math.sqrt(hd)
        path = self.attention_path(hd)[0]
        if path == "flash-varlen" or path == "efficient-varlen":
            cu32 = cu_seqlens.to(torch.int32)
            forward = flash_varlen_forward if path == "flash-varlen" else efficient_varlen_forward
            out, saved = forward(qkv, cu32, n_heads, max_seqlen, scale, n_kv_heads=Hkv)
            return out, (path, cu32, saved)
        S, L = cu_seqlens.shape[0] - 1, max_seqlen
        idx = pad_index(cu_seqlens, N, L)
        q, k, v = padded_qkv(qkv.to(self._padded_dtype(path, L)), idx, S, L, n_heads, Hkv)  # (S, H|Hkv, L, hd)
        group = self._padded_group(path, n_heads, Hkv)
        k, v = expand_kv(k, group, 1), expand_kv(v, group, 1)    # (S, H, L, hd) where the kernel wants H
        if path == "cpu-flash-padded":
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        else:
            o, lse = math_attention_forward(q, k, v, scale)
        return merge_heads(o, idx).to(qkv.dtype), (path, idx, lse)

    @torch.no_grad()
    def attention_backward(self, dout, qkv, out, ctx, cu_seqlens, n_heads, max_seqlen, n_kv_heads=None):
        path, a, saved = ctx
        Hkv = n_kv_heads or n_heads
        N, W = qkv.shape
        scale = 1.0 / math.sqrt(W // (n_heads + 2 * Hkv))
        dout = dout.to(qkv.dtype)
        if path == "flash-varlen":
            return flash_varlen_backward(dout, qkv, out, saved, a, n_heads, max_seqlen, scale, n_kv_heads=Hkv)
        if path == "efficient-varlen":
            return efficient_varlen_backward(dout, qkv, out, saved, a, n_heads, max_seqlen, scale, n_kv_heads=Hkv)
        idx, lse, S, L = a, saved, cu_seqlens.shape[0] - 1, max_seqlen
        dt = self._padded_dtype(path, L)
        q, k, v = padded_qkv(qkv.to(dt), idx, S, L, n_heads, Hkv)   # (S, H, L, hd), (S, Hkv, L, hd) x 2
        group = self._padded_group(path, n_heads, Hkv)
        k, v = expand_kv(k, group, 1), expand_kv(v, group, 1)      # as the forward fed its kernel
        do = padded_heads(dout.to(dt), idx, S, L, n_heads)         # (S, H, L, hd), 0 on padding rows
        if path == "cpu-flash-padded":
            o = padded_heads(out.to(dt), idx, S, L, n_heads)
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                do, q, k, v, o, lse, 0.0, True, scale=scale)
        else:
            dq, dk, dv = math_attention_backward(do, q, k, v, lse, scale)
        # forward: k, v = expand_kv(k), expand_kv(v), so each kv head's gradient sums over its group
        dk, dv = sum_groups(dk, group, 1), sum_groups(dv, group, 1)  # (S, Hkv, L, hd) each
        # dq, dk, dv -> (S, L, H + 2 Hkv, hd) in one copy -> packed (N, W)
        dqkv = torch.cat([g.transpose(1, 2) for g in (dq, dk, dv)], dim=2).view(S * L, W)
        return from_padded(dqkv, idx).to(qkv.dtype)

    # ---- SwiGLU over a fused [gate | up]: float32 arithmetic under bfloat16, rounded once ----------
    @torch.no_grad()
    def swiglu_forward(self, gu):
        f = gu.shape[1] // 2
        g, u = gu[:, :f].to(self.store), gu[:, f:].to(self.store)  # (N, f) each
        return (F.silu(g) * u).to(gu.dtype)                       # (N, f) silu(gate) * up

    @torch.no_grad()
    def swiglu_backward(self, dy, gu):
        f = gu.shape[1] // 2
        g, u = gu[:, :f].to(self.store), gu[:, f:].to(self.store)  # (N, f) each
        dy = dy.to(self.store)                                    # (N, f)
        sig = torch.sigmoid(g)                                    # (N, f)
        dgu = torch.empty_like(gu)                                # (N, 2f)
        # forward: y = silu(g) * u with silu(g) = g sig(g), so dsilu/dg = sig + g sig (1 - sig)
        dgu[:, :f] = dy * u * (sig + g * sig * (1.0 - sig))       # dgate
        dgu[:, f:] = dy * g * sig                                 # dup = dy * silu(g)
        return dgu

    # ---- GELU (tanh approximation), torch's kernels for the numpy backend's formula ---------------
    @torch.no_grad()
    def gelu_forward(self, x):
        return F.gelu(x, approximate="tanh")

    @torch.no_grad()
    def gelu_backward(self, dy, x):
        return torch.ops.aten.gelu_backward(dy.to(x.dtype), x, approximate="tanh")

    # ---- residual (float32 under bfloat16: a bfloat16 branch output is promoted) -----------------
    @torch.no_grad()
    def residual_forward(self, a, b):
        return a + b

    def residual_backward(self, dy):
        return dy, dy

    # ---- dropout ---------------------------------------------------------------------------------
    @torch.no_grad()
    def dropout_forward(self, x, p, rng):
        if self.host_masks:
            keep = torch.from_numpy(rng.random(tuple(x.shape)) >= p).to(self.device)
        else:
            if self._generator is None:
                self._generator = torch.Generator(self.device)
            self._generator.manual_seed(int(rng.integers(2 ** 63)))
            keep = torch.rand(x.shape, generator=self._generator, device=self.device) >= p
        mask = keep.to(self.store).mul_(1.0 / (1.0 - p))  # (N, d): 1/(1-p) where kept, 0 where dropped
        return x * mask, mask

    @torch.no_grad()
    def dropout_backward(self, dy, mask):
        return dy * mask

    # ---- fused output head + cross-entropy --------------------------------------------------------
    @torch.no_grad()
    def head_loss(self, h, w, targets, dw=None, grad_scale=1.0, need_dh=False, lora=None, dw_fresh=False):
        if torch.is_tensor(targets):  # a device array costs a copy back (a sync): pass the host one
            targets = targets.cpu().numpy()
        targets = np.asarray(targets)
        rows = np.flatnonzero(targets != IGNORE_INDEX)            # (M,) found on the host: no sync
        t_host = targets[rows]
        V = w.shape[0]
        if t_host.size and (t_host.min() < 0 or t_host.max() >= V):
            raise ValueError(f"head_loss: targets must lie in [0, {V}) or be {IGNORE_INDEX}")
        rows_d, t_d = self.index(rows), self.index(t_host)        # (M,) each, on the device
        wc = self._weight(w)                                      # (V, d)
        loss_sum = torch.zeros((), dtype=self.store, device=self.device)
        grad = dw is not None or need_dh
        dh = torch.zeros_like(h) if grad else None                # (N, d)
        if lora is not None:
            u, lb, du, ldb = lora
            lb = lb.to(self.compute)                              # (r, V)
        R = self.head_chunk_rows
        for c in range(0, len(rows), R):
            r, t = rows_d[c:c + R], t_d[c:c + R, None]            # (R,), (R, 1)
            hr = h.index_select(0, r).to(self.compute)            # (R, d)
            logits = hr @ wc.T                                    # (R, V)
            if lora is not None:
                ur = u.index_select(0, r).to(self.compute)        # (R, r)
                logits = logits.addmm_(ur, lb)                    # += u @ b
            logits = logits.to(self.store)                        # softmax in float32/64
            lse = torch.logsumexp(logits, dim=1, keepdim=True)    # (R, 1)
            # loss_i = logsumexp(logits_i) - logits_i[t_i]
            loss_sum += (lse - logits.gather(1, t)).sum()
            if not grad:
                continue
            # d loss_i / d logits_i = softmax(logits_i) - onehot(t_i), in the chunk's logits memory
            dlogits = logits.sub_(lse).exp_()
            dlogits.scatter_(1, t, dlogits.gather(1, t) - 1.0)
            dlogits = dlogits.mul_(grad_scale).to(self.compute)   # (R, V)
            dh.index_copy_(0, r, dlogits @ wc)                    # (R, d)
            if lora is not None:                                  # undoes logits += u @ b
                du.index_copy_(0, r, (dlogits @ lb.T).to(du.dtype))  # (R, r)
                ldb.add_((ur.T @ dlogits).to(ldb.dtype))          # (r, V)
            if dw is None:
                continue
            if dw_fresh and c == 0:                               # the first chunk writes dw outright
                torch.mm(dlogits.T, hr, out=dw) if dw.dtype == dlogits.dtype else dw.copy_(dlogits.T @ hr)
            elif dw.dtype == dlogits.dtype:
                dw.addmm_(dlogits.T, hr)                          # (V, d)
            else:
                dw.add_(dlogits.T @ hr)                           # bfloat16 product into float32
        if dw is not None and dw_fresh and len(rows) == 0:
            dw.zero_()
        return loss_sum, len(rows), dh

    @torch.no_grad()
    def head_logits(self, h, w):
        return (h.to(self.compute) @ w.to(self.compute).T).to(self.store)  # (N, V)

    # ---- KV-cache decoding (forward only; the numpy reference explains each step) ---------------
    @torch.no_grad()
    def take_rows(self, x, rows):
        return x.index_select(0, rows)                            # (R, ...)

    @property
    def kv_dtype(self):
        return self.compute  # keys and values are written as the attention computes them

    def kv_cache_alloc(self, n_seqs, n_heads, max_len, head_dim):
        shape = (n_seqs, n_heads, max_len, head_dim)              # (S, H, T, hd)
        return (torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                torch.zeros(shape, dtype=self.kv_dtype, device=self.device))

    @torch.no_grad()
    def kv_cache_write(self, k_cache, v_cache, qkv, seq_ids, positions):
        N, W = qkv.shape
        Hkv, hd = k_cache.shape[1], k_cache.shape[3]
        heads = qkv.view(N, W // hd, hd)                          # (N, H + 2 Hkv, hd)
        k, v = heads[:, -2 * Hkv:-Hkv], heads[:, -Hkv:]           # (N, Hkv, hd) each
        k_cache[seq_ids, :, positions] = k.to(k_cache.dtype)
        v_cache[seq_ids, :, positions] = v.to(v_cache.dtype)

    @torch.no_grad()
    def attention_decode(self, qkv, k_cache, v_cache, lens, n_heads, max_len):
        S = qkv.shape[0]
        Hkv, hd = k_cache.shape[1], k_cache.shape[3]
        G = n_heads // Hkv                                            # query heads per cache head
        # grouped by cache head: the G queries of a group share one matmul with its keys, no copy of them
        q = qkv[:, :n_heads * hd].reshape(S, Hkv, G, hd).to(k_cache.dtype)  # (S, Hkv, G, hd)
        k, v = k_cache[:, :, :max_len], v_cache[:, :, :max_len]       # (S, Hkv, T, hd) views
        scores = (q @ k.transpose(2, 3)).to(self.store) / math.sqrt(hd)  # (S, Hkv, G, T), softmax in fp32+
        seen = torch.arange(max_len, device=self.device) < lens[:, None]  # (S, T) cache positions in use
        p = scores.masked_fill(~seen[:, None, None, :], float("-inf")).softmax(-1)
        return (p.to(v.dtype) @ v).reshape(S, n_heads * hd).to(self.store)  # (S, H hd) heads side by side

    # ---- AdamW (float32 moments and master weights under bfloat16) --------------------------------
    @torch.no_grad()
    def adamw_step(self, p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
        self._wc.pop(id(p), None)  # p changes: its compute-dtype copy is made again at its next use
        if self.adamw_problem is None:
            if self._step[0] != step:  # the fused kernel reads the step count from a device tensor
                self._step = (step, torch.full((), float(step), dtype=torch.float32, device=self.device))
            torch._fused_adamw_([p], [g], [m], [v], [], [self._step[1]], lr=lr, beta1=beta1, beta2=beta2,
                                weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)
            return
        # The numpy backend's sequence (torch.optim.AdamW's single-tensor order of operations).
        p.mul_(1.0 - lr * weight_decay)
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = v.sqrt().div_(math.sqrt(1.0 - beta2 ** step)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1.0 - beta1 ** step))

    # ---- lean AdamW state (formats: quant.py), a chunk of whole blocks at a time ------------------
    def optim_state_zeros(self, n, kind):
        return torch.zeros(n, dtype=LEAN_DTYPES[kind], device=self.device)

    def optim_state_from_numpy(self, x):
        if x.dtype == np.uint16:
            return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16).to(self.device)
        return torch.from_numpy(np.array(x)).to(self.device)

    def optim_state_to_numpy(self, x):
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).cpu().numpy().view(np.uint16).copy()
        return x.to("cpu", copy=True).numpy()

    @staticmethod
    def _adamw_f32(p, g, m, v, lr, beta1, beta2, eps, weight_decay, step):
        """The numpy backend's _adamw_f32 on flat float32 tensors, the same operations in the same order."""
        p.mul_(1.0 - lr * weight_decay)
        m = m * beta1 + g * (1.0 - beta1)                                    # (n,)
        v = v * beta2 + g * (1.0 - beta2) * g                                # (n,)
        root = v.sqrt()                                                      # (n,)
        p.sub_((m / (root / math.sqrt(1.0 - beta2 ** step) + eps)) * (lr / (1.0 - beta1 ** step)))
        return m, v, root

    def _codes(self):
        if not hasattr(self, "_code_tensors"):
            self._code_tensors = [torch.from_numpy(c).to(self.device)
                                  for c in (quant.M_CODE, quant.M_MID, quant.V_CODE, quant.V_MID)]
        return self._code_tensors

    def _bf16_round(self, x, salt, offset):
        """quant.bf16_round on a float32 chunk whose first element is element `offset` of its tensor;
        int64 arithmetic (its products wrap, and the masks keep the low 32 bits)."""
        i = torch.arange(offset, offset + x.numel(), dtype=torch.int64, device=x.device)      # (n,)
        h = (i * quant.GOLDEN + salt) & quant.MASK32
        r = quant.fmix32(h) >> quant.ROUND_BITS
        u = x.view(torch.int32).to(torch.int64) & quant.MASK32
        bits = ((u + r) >> quant.ROUND_BITS) & 0xFFFF
        return (bits - ((bits >> 15) << 16)).to(torch.int16).view(torch.bfloat16)  # as signed 16-bit

    @torch.no_grad()
    def adamw_step_bf16(self, p, g, m, v, lr, beta1, beta2, eps, weight_decay, step, key):
        self._wc.pop(id(p), None)  # p changes: its compute-dtype copy is made again at its next use
        P, G = p.view(-1), g.reshape(-1)
        salt_m, salt_v = quant.round_salt(step, key, 0), quant.round_salt(step, key, 1)
        for lo in range(0, P.numel(), LEAN_CHUNK):
            sl = slice(lo, lo + LEAN_CHUNK)
            mf, vf, _ = self._adamw_f32(P[sl], G[sl], m[sl].float(), v[sl].float(),
                                        lr, beta1, beta2, eps, weight_decay, step)
            m[sl] = self._bf16_round(mf, salt_m, lo)
            v[sl] = self._bf16_round(vf, salt_v, lo)

    def _dequantize(self, q, scale, code):
        return code[q.long()] * scale.repeat_interleave(quant.BLOCK)[:q.numel()]

    def _quantize(self, x, code_mid, q, scale):
        """quant.quantize into q, scale: the block scales on x zero-padded to whole blocks."""
        pad = (-x.numel()) % quant.BLOCK
        scale.copy_(F.pad(x.abs(), (0, pad)).view(-1, quant.BLOCK).amax(dim=1))
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q.copy_(torch.bucketize(x / safe.repeat_interleave(quant.BLOCK)[:x.numel()], code_mid))

    @torch.no_grad()
    def adamw_step_8bit(self, p, g, qm, sm, qv, sv, lr, beta1, beta2, eps, weight_decay, step):
        self._wc.pop(id(p), None)  # p changes: its compute-dtype copy is made again at its next use
        m_code, m_mid, v_code, v_mid = self._codes()
        P, G, nb = p.view(-1), g.reshape(-1), LEAN_CHUNK // quant.BLOCK
        for lo in range(0, P.numel(), LEAN_CHUNK):
            sl, bl = slice(lo, lo + LEAN_CHUNK), slice(lo // quant.BLOCK, lo // quant.BLOCK + nb)
            w = self._dequantize(qv[sl], sv[bl], v_code)                                      # (n,) sqrt(v)
            mf, _, root = self._adamw_f32(P[sl], G[sl], self._dequantize(qm[sl], sm[bl], m_code), w * w,
                                          lr, beta1, beta2, eps, weight_decay, step)
            self._quantize(mf, m_mid, qm[sl], sm[bl])
            self._quantize(root, v_mid, qv[sl], sv[bl])

    @torch.no_grad()
    def global_norm(self, grads):
        grads = list(grads)
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item())

    @torch.no_grad()
    def scale_(self, grads, s):
        torch._foreach_mul_(list(grads), s)
