"""The backend contract, executable: every method backends/interface.py declares exists on every
installed backend in each dtype it supports, with the declared signature, runs once on small fresh
random inputs and returns what the interface says: the same structure as the numpy reference, each
array of the backend's own array type with the reference's shape and dtype. The numbers are the
parity tests' job (test_backend_parity.py, test_torch_backend.py, test_memory.py).
"""
import inspect

import numpy as np
import pytest

from minisft.backends import dtype_problem, interface, optim_state, quant
from minisft.backends.constants import IGNORE_INDEX, STORE_DTYPES
from minisft.backends.numpy_backend import NumpyBackend
from tests.helpers import backend_or_skip

DTYPES = {"numpy": ("float32", "float64"), "numba": ("float32", "float64", "bfloat16"),
          "torch": ("float32", "float64", "bfloat16")}
CASES = [(name, dtype) for name, dtypes in DTYPES.items() for dtype in dtypes]
METHODS = sorted(interface.Backend.__abstractmethods__)

# Two packed sequences of 4 and 6 positions; width 8 in 2 heads of 4; vocabulary 13; context 12;
# LoRA rank 3; a flat AdamW tensor of 2 blocks and a bit (the lean kernels' block edge).
LENS, D, H, V, C, R, P = (4, 6), 8, 2, 13, 12, 3, quant.BLOCK * 2 + 5
N, S, HD = sum(LENS), len(LENS), D // H


def host_inputs(seed=0) -> dict:
    """Fresh random numpy inputs, none all-zero (a kernel that ignored an input could pass on zeros)."""
    rng = np.random.default_rng(seed)
    f = lambda *shape: rng.standard_normal(shape)  # noqa: E731
    targets = rng.integers(0, V, N)
    targets[[1, 6]] = IGNORE_INDEX
    return dict(x=f(N, D), y=f(N, D), w=1 + 0.1 * f(D), b=f(D), w_lin=f(D, 3 * D), b_lin=f(3 * D),
                dy_lin=f(N, 3 * D), qkv=f(N, 3 * D), dx=f(N, D), wte=f(V, D), wpe=f(C, D), x4=f(N, 4 * D),
                lora_a=f(D, R), lora_b=f(R, D), u=f(N, R), head_b=f(R, V), qkv_dec=f(S, 3 * D),
                p=f(P), g=f(P), m=0.1 * f(P), v=0.1 * f(P) ** 2, tokens=rng.integers(0, V, N),
                positions=np.concatenate([np.arange(n) for n in LENS]), cu=np.cumsum((0,) + LENS),
                targets=targets, rows=np.cumsum(LENS) - 1, lens=np.array([3, 5]), m8=rng.integers(0, 256, P),
                bits=rng.integers(0, 2**16, P).astype(np.uint16))


class Host:
    """A result the interface says is a numpy array (to_numpy's, optim_state_to_numpy's)."""
    def __init__(self, x):
        self.x = x


class State:
    """A lean optimizer-state array: a backend array, compared through optim_state_to_numpy."""
    def __init__(self, x):
        self.x = x


def calls(B) -> dict:
    """{method: a function calling it once on fresh inputs -> its results}. In-place methods return
    the arrays they write; opaque results (attention's ctx) are passed on, never compared. An array
    a kernel takes back from another (h, u, mean, rstd, ctx) is the one this backend returned."""
    a = host_inputs()
    f = lambda k: B.from_numpy(a[k])  # noqa: E731
    i = lambda k: B.index(a[k])       # noqa: E731

    def layernorm_backward():
        x, w = f("x"), f("w")
        _, mean, rstd = B.layernorm_forward(x, w, f("b"))
        return B.layernorm_backward(f("y"), x, w, mean, rstd), B.layernorm_backward(f("y"), x, w, mean, rstd, f("dx"))

    def embedding_backward():
        dwte, dwpe = f("wte"), f("wpe")
        assert B.embedding_backward(dwte, dwpe, f("dx"), i("tokens"), i("positions")) is None
        return dwte, dwpe

    def add_():
        dst = f("x")
        assert B.add_(dst, f("y")) is None
        return dst

    def lora_forward():
        y = f("dy_lin")
        u = B.lora_forward(y, f("x"), f("lora_a"), f("lora_b"), 0.5, col=D)
        return y, u

    def attention_backward():
        qkv = f("qkv")
        out, ctx = B.attention_forward(qkv, i("cu"), H, max(LENS))
        return B.attention_backward(f("dx"), qkv, out, ctx, i("cu"), H, max(LENS))

    def dropout_backward():
        _, mask = B.dropout_forward(f("x"), 0.25, B.rng(1))
        return B.dropout_backward(f("y"), mask)

    def rng():  # a seeded RNG: the same seed draws the same dropout masks
        masks = [B.to_numpy(B.dropout_forward(f("x"), 0.5, B.rng(7))[1]) for _ in range(2)]
        return bool(np.array_equal(*masks))

    def head_loss():
        h, w, t = B.layernorm_forward(f("x"), f("w"), f("b"))[0], f("wte"), a["targets"]  # h as the model's
        dw, fresh, du, db = f("wte"), B.empty_like(f("wte")), B.empty_like(f("u")), f("head_b")
        u = B.lora_down_forward(h, f("lora_a"), 0.5)                                       # (N, r)

        def zero_d(result):  # loss_sum is 0-d, of float64 or the store dtype (the backend's choice)
            loss_sum, n_valid, dh = result
            return B.to_numpy(loss_sum).shape, n_valid, dh
        return (zero_d(B.head_loss(h, w, t)),                                      # evaluation: no gradient
                zero_d(B.head_loss(h, w, t, dw=dw, grad_scale=0.5)), dw,           # added into dw
                zero_d(B.head_loss(h, w, t, dw=fresh, dw_fresh=True)), fresh,      # written into dw
                zero_d(B.head_loss(h, w, t, need_dh=True, lora=(u, f("head_b"), du, db))), du, db)  # frozen

    def item():
        return B.item(B.head_loss(B.layernorm_forward(f("x"), f("w"), f("b"))[0], f("wte"), a["targets"])[0])

    def kv_cache_alloc():
        k, v = B.kv_cache_alloc(S, H, C, HD)
        return k, v, float(np.abs(B.to_numpy(k)).sum() + np.abs(B.to_numpy(v)).sum())

    def kv_cache_write():
        k, v = B.kv_cache_alloc(S, H, C, HD)
        seq_ids = np.repeat(np.arange(S), LENS)
        assert B.kv_cache_write(k, v, f("qkv"), B.index(seq_ids), i("positions")) is None
        return k, v

    def attention_decode():
        k, v = B.kv_cache_alloc(S, H, C, HD)
        B.kv_cache_write(k, v, f("qkv"), B.index(np.repeat(np.arange(S), LENS)), i("positions"))
        return B.attention_decode(f("qkv_dec"), k, v, i("lens"), H, int(a["lens"].max()))

    def adamw_step():
        p, m, v = f("p"), f("m"), f("v")
        assert B.adamw_step(p, f("g"), m, v, 1e-2, 0.9, 0.999, 1e-8, 0.1, 3) is None
        return p, m, v

    def optim_state_zeros():
        return [State(B.optim_state_zeros(P, kind)) for kind in ("bf16", "u8", "scale")]

    def optim_state_round_trip():
        host = (a["bits"], a["m8"].astype(np.uint8), a["p"].astype(np.float32))
        return [Host(B.optim_state_to_numpy(B.optim_state_from_numpy(x))) for x in host]

    def adamw_step_bf16():
        p, m, v = f("p"), B.optim_state_zeros(P, "bf16"), B.optim_state_zeros(P, "bf16")
        assert B.adamw_step_bf16(p, f("g"), m, v, 1e-2, 0.9, 0.999, 1e-8, 0.1, 1, 4) is None
        return p, State(m), State(v)

    def adamw_step_8bit():
        p = f("p")
        qm, qv = B.optim_state_zeros(P, "u8"), B.optim_state_zeros(P, "u8")
        sm, sv = (B.optim_state_zeros(quant.n_blocks(P), "scale") for _ in range(2))
        assert B.adamw_step_8bit(p, f("g"), qm, sm, qv, sv, 1e-2, 0.9, 0.999, 1e-8, 0.1, 1) is None
        return p, State(qm), State(sm), State(qv), State(sv)

    def scale_():
        grads = [f("x"), f("wte")]
        assert B.scale_(grads, 0.5) is None
        return grads

    return {
        "from_numpy": lambda: f("x"),
        "index": lambda: i("tokens"),
        "to_numpy": lambda: Host(B.to_numpy(f("x"))),
        "zeros_like": lambda: B.zeros_like(f("x")),
        "empty_like": lambda: B.empty_like(f("x")),
        "add_": add_,
        "rng": rng,
        "item": item,
        "embedding_forward": lambda: B.embedding_forward(i("tokens"), i("positions"), f("wte"), f("wpe")),
        "embedding_backward": embedding_backward,
        "layernorm_forward": lambda: B.layernorm_forward(f("x"), f("w"), f("b")),
        "layernorm_backward": layernorm_backward,
        "linear_forward": lambda: (B.linear_forward(f("x"), f("w_lin"), f("b_lin")),
                                   B.linear_forward(f("x"), f("w_lin"), None)),
        "linear_backward": lambda: (B.linear_backward(f("dy_lin"), f("x"), f("w_lin")),
                                    B.linear_backward(f("dy_lin"), f("x"), f("w_lin"), need_dw=False)),
        "lora_forward": lora_forward,
        "lora_backward": lambda: B.lora_backward(f("dy_lin"), f("x"), B.lora_down_forward(f("x"), f("lora_a"), 0.5),
                                                 f("lora_a"), f("lora_b"), 0.5, col=D),
        "lora_down_forward": lambda: B.lora_down_forward(f("x"), f("lora_a"), 0.5),
        "lora_down_backward": lambda: B.lora_down_backward(f("u"), f("x"), f("lora_a"), 0.5),
        "attention_forward": lambda: B.attention_forward(f("qkv"), i("cu"), H, max(LENS))[0],
        "attention_backward": attention_backward,
        "gelu_forward": lambda: B.gelu_forward(f("x4")),
        "gelu_backward": lambda: B.gelu_backward(f("x4"), f("x4")),
        "residual_forward": lambda: B.residual_forward(f("x"), f("y")),
        "residual_backward": lambda: B.residual_backward(f("x")),
        "dropout_forward": lambda: B.dropout_forward(f("x"), 0.25, B.rng(1)),
        "dropout_backward": dropout_backward,
        "head_loss": head_loss,
        "head_logits": lambda: B.head_logits(f("x"), f("wte")),
        "take_rows": lambda: (B.take_rows(f("x"), i("rows")),
                              B.take_rows(B.kv_cache_alloc(S, H, C, HD)[0], B.index([1]))),
        "kv_dtype": lambda: isinstance(B.kv_dtype.itemsize, int),
        "kv_cache_alloc": kv_cache_alloc,
        "kv_cache_write": kv_cache_write,
        "attention_decode": attention_decode,
        "adamw_step": adamw_step,
        "optim_state_zeros": optim_state_zeros,
        "optim_state_from_numpy": optim_state_round_trip,
        "optim_state_to_numpy": optim_state_round_trip,
        "adamw_step_bf16": adamw_step_bf16,
        "adamw_step_8bit": adamw_step_8bit,
        "global_norm": lambda: B.global_norm([f("x"), f("wte")]),
        "scale_": scale_,
        **llama_calls(B),
    }


# ---- the Llama family's kernels (minisft/llama.py) ---------------------------------------------------
# Grouped-query shapes: the same packed batch, HL query heads and HKV key/value heads of width HD.
HL, HKV = 4, 2
WL = (HL + 2 * HKV) * HD


def llama_calls(B) -> dict:
    """calls(B)'s entries for the Llama family's kernels."""
    a, rng = host_inputs(), np.random.default_rng(1)
    f = lambda k: B.from_numpy(a[k])  # noqa: E731
    g = lambda *shape: B.from_numpy(rng.standard_normal(shape))  # noqa: E731
    i = lambda k: B.index(a[k])       # noqa: E731
    qkv, wq, wk, gu = g(N, WL), 1 + 0.1 * rng.standard_normal(HD), 1 + 0.1 * rng.standard_normal(HD), g(N, 2 * D)
    wq, wk = B.from_numpy(wq), B.from_numpy(wk)
    cos, sin = g(C, HD // 2), g(C, HD // 2)

    def token_embedding_backward():
        dwte = f("wte")
        assert B.token_embedding_backward(dwte, f("dx"), i("tokens")) is None
        return dwte

    def rmsnorm_backward():
        x, w = f("x"), f("w")
        _, rstd = B.rmsnorm_forward(x, w, 1e-5)
        return B.rmsnorm_backward(f("y"), x, w, rstd), B.rmsnorm_backward(f("y"), x, w, rstd, f("dx"))

    def qk_norm_backward():
        _, rstd = B.qk_norm_forward(qkv, wq, wk, 1e-6, HL, HKV)
        return B.qk_norm_backward(g(N, WL), qkv, wq, wk, rstd, HL, HKV)

    return {
        "token_embedding_forward": lambda: B.token_embedding_forward(i("tokens"), f("wte")),
        "token_embedding_backward": token_embedding_backward,
        "rmsnorm_forward": lambda: B.rmsnorm_forward(f("x"), f("w"), 1e-5),
        "rmsnorm_backward": rmsnorm_backward,
        "qk_norm_forward": lambda: B.qk_norm_forward(qkv, wq, wk, 1e-6, HL, HKV),
        "qk_norm_backward": qk_norm_backward,
        "rope_forward": lambda: B.rope_forward(qkv, cos, sin, i("positions"), HL + HKV),
        "rope_backward": lambda: B.rope_backward(qkv, cos, sin, i("positions"), HL + HKV),
        "swiglu_forward": lambda: B.swiglu_forward(gu),
        "swiglu_backward": lambda: B.swiglu_backward(g(N, D), gu),
    }


def grouped_calls(B) -> dict:
    """The attention and decoding kernels with fewer key/value heads than query heads."""
    a, rng = host_inputs(), np.random.default_rng(2)
    qkv = B.from_numpy(rng.standard_normal((N, WL)))
    cu, lens = B.index(a["cu"]), B.index(a["lens"])

    def attention():
        out, ctx = B.attention_forward(qkv, cu, HL, max(LENS), n_kv_heads=HKV)
        return out, B.attention_backward(B.from_numpy(rng.standard_normal((N, HL * HD))), qkv, out, ctx, cu, HL,
                                         max(LENS), n_kv_heads=HKV)

    def decode():
        k, v = B.kv_cache_alloc(S, HKV, C, HD)
        assert B.kv_cache_write(k, v, qkv, B.index(np.repeat(np.arange(S), LENS)), B.index(a["positions"])) is None
        q = B.from_numpy(rng.standard_normal((S, WL)))
        return k, v, B.attention_decode(q, k, v, lens, HL, int(a["lens"].max()))
    return {"attention": attention, "decode": decode}


@pytest.mark.parametrize("name, dtype", CASES)
def test_grouped_query_attention_runs_and_returns_what_the_reference_returns(name, dtype):
    if problem := dtype_problem(dtype, name):
        pytest.skip(problem)
    B, ref = backend_or_skip(name, dtype), NumpyBackend(STORE_DTYPES[dtype])
    got, want = grouped_calls(B), grouped_calls(ref)
    for case in want:
        assert describe(B, got[case]()) == describe(ref, want[case]()), case


LEAN = {"optim_state_zeros", "optim_state_from_numpy", "optim_state_to_numpy", "adamw_step_bf16", "adamw_step_8bit"}


def describe(B, out):
    """The structure of a result: arrays as (kind, shape, numpy dtype), ints and bools by value
    (counts, flags), floats by type. Asserts every array is of the backend's array type."""
    array_type = type(B.zeros_like(B.from_numpy(np.ones(1))))
    if isinstance(out, (tuple, list)):
        return tuple(describe(B, o) for o in out)
    if isinstance(out, Host):
        assert type(out.x) is np.ndarray, f"{type(out.x)} is not a numpy array"
        return "host", out.x.shape, out.x.dtype
    if isinstance(out, State):
        assert isinstance(out.x, array_type), f"{type(out.x)} is not a {array_type}"
        host = B.optim_state_to_numpy(out.x)
        return "state", host.shape, host.dtype
    if out is None or isinstance(out, (bool, int)):
        return out
    if isinstance(out, float):
        return float
    assert isinstance(out, array_type), f"{type(out)} is not a {array_type}"
    host = B.to_numpy(out)
    return "array", host.shape, host.dtype


def test_every_declared_method_has_a_call_here():
    assert set(calls(NumpyBackend())) == set(METHODS)


@pytest.mark.parametrize("name", DTYPES)
def test_every_backend_implements_every_method_with_the_declared_signature(name):
    B = backend_or_skip(name, "float32")
    assert isinstance(B, interface.Backend)
    for method in METHODS:
        declared, got = getattr(interface.Backend, method), getattr(type(B), method)
        if isinstance(declared, property):
            assert isinstance(got, property), f"{name}.{method} is not a property"
            continue
        want = [(p.name, p.kind, p.default) for p in inspect.signature(declared).parameters.values()]
        have = [(p.name, p.kind, p.default) for p in inspect.signature(got).parameters.values()]
        assert have == want, f"{name}.{method}{inspect.signature(got)} != the interface's {inspect.signature(declared)}"


def test_a_backend_missing_a_method_cannot_be_built():
    """The interface's methods are abstract: a backend lacking one fails when built, naming it."""
    methods = {m: getattr(NumpyBackend, m) for m in METHODS if m != "head_logits"}
    Partial = type("Partial", (interface.Backend,), methods)
    with pytest.raises(TypeError, match="head_logits"):
        Partial()


@pytest.mark.parametrize("name, dtype", CASES)
def test_every_method_runs_and_returns_what_the_reference_returns(name, dtype):
    problem = dtype_problem(dtype, name)
    if problem:
        pytest.skip(problem)
    B, ref = backend_or_skip(name, dtype), NumpyBackend(STORE_DTYPES[dtype])
    assert B.name == name and B.dtype == dtype
    got, want = calls(B), calls(ref)
    for method in METHODS:
        if method in LEAN and dtype == "float64":
            continue  # lean AdamW state needs float32 master weights (backends/quant.py)
        assert describe(B, got[method]()) == describe(ref, want[method]()), method


# Lean AdamW state needs float32 master weights (backends/quant.py): float64 runs only fp32 moments.
STATE_CASES = [(name, dtype, state) for name, dtype in CASES for state in optim_state.OPTIM_STATES
               if not (optim_state.FORMATS[state].lean and dtype == "float64")]


@pytest.mark.parametrize("name, dtype, state", STATE_CASES)
def test_every_optimizer_state_format_runs_on_every_backend_as_its_layout_says(name, dtype, state):
    """Each format's zeros come back from to_host as its checkpoint layout says, from_host returns
    them exactly, and one step through the format updates the weights and keeps the layout."""
    fmt = optim_state.FORMATS[state]
    if problem := dtype_problem(dtype, name):
        pytest.skip(problem)
    B, a = backend_or_skip(name, dtype), host_inputs()
    p, g = B.from_numpy(a["p"].reshape(-1, 3)), B.from_numpy(a["g"].reshape(-1, 3))    # (P / 3, 3): a matrix
    s = fmt.zeros(B, p)
    layout = fmt.layout(p.shape, STORE_DTYPES[dtype])
    assert tuple(s) == tuple(layout) == fmt.groups
    fmt.step(B, p, g, s, 1e-2, 0.9, 0.999, 1e-8, 0.1, 1, 4)
    assert not np.array_equal(B.to_numpy(p), a["p"].reshape(-1, 3).astype(B.to_numpy(p).dtype))
    for k, x in s.items():
        host = fmt.to_host(B, x)
        assert type(host) is np.ndarray and (host.shape, host.dtype) == layout[k], k
        np.testing.assert_array_equal(fmt.to_host(B, fmt.from_host(B, host)), host)
