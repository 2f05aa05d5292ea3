"""The GPT-2 block, written once: an ordered list of stages, each naming its op, the values it reads and
the value it makes, and its parameters by Hugging Face module name. Everything that runs a block walks
this list: the engine's forward and backward (minisft/model.py: the backward in reverse), the study's
stages (minisft/study.py), and the PyTorch-autograd blocks (minisft/peer.py, study.torch_gradients).

    x ─┬─ ln_1 ─ attn.c_attn ─ attention ─ attn.c_proj ─ dropout ─(+)─ x2
       └───────────────────────────────────────────────────────────┘
    x2 ┬─ ln_2 ─ mlp.c_fc ─ gelu ─ mlp.c_proj ─ dropout ─(+)─ out (the next block's x)
       └────────────────────────────────────────────────┘

Every block reads "x" and makes "out"; the other names are the block's own. Each engine supplies one
implementation per op (layernorm, linear, attention, gelu, residual) and the walk does the rest.
A module of its own (not minisft/models/gpt2.py): minisft has one model, and the package is flat.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    out: str                # the value it makes
    op: str                 # layernorm | linear | attention | gelu | residual
    ins: tuple              # the values it reads
    module: str | None = None  # its parameters: module + ".weight" / ".bias" (HF names, under h.{i}.)
    dropout: bool = False   # its output goes through dropout in training (the two residual branches)
    forward: str = ""       # its math, as the study prints it
    backward: str = ""      # the backward that undoes it, as the study prints it
    tensors: tuple = ("weight", "bias")  # its parameters' names under module (a linear's bias may be absent)

    def params(self, prefix: str) -> tuple:
        """The names of its parameters under prefix (h.{i}.), in tensors' order; () for none."""
        return () if self.module is None else tuple(f"{prefix}{self.module}.{t}" for t in self.tensors)


BLOCK = (
    Stage("ln1", "layernorm", ("x",), "ln_1",
          forward="ln1 = layernorm(x; ln_1)", backward="dx, dw, db = layernorm_backward(dln1)"),
    Stage("qkv", "linear", ("ln1",), "attn.c_attn",
          forward="qkv = ln1 @ c_attn.w + c_attn.b", backward="dln1 = dqkv @ wT;  dw = ln1T @ dqkv;  db = sum_n dqkv"),
    Stage("atty", "attention", ("qkv",),
          forward="atty = attention(qkv)   (causal, per packed sequence)", backward="dqkv = attention_backward(datty)"),
    Stage("attproj", "linear", ("atty",), "attn.c_proj", dropout=True,
          forward="attproj = atty @ attn.c_proj.w + b",
          backward="datty = dattproj @ wT;  dw = attyT @ dattproj;  db = sum_n dattproj"),
    Stage("x2", "residual", ("x", "attproj"),
          forward="x2 = x + attproj", backward="dx = dx2;  dattproj = dx2"),
    Stage("ln2", "layernorm", ("x2",), "ln_2",
          forward="ln2 = layernorm(x2; ln_2)", backward="dx2, dw, db = layernorm_backward(dln2)"),
    Stage("fch", "linear", ("ln2",), "mlp.c_fc",
          forward="fch = ln2 @ c_fc.w + c_fc.b   (N, 4d)",
          backward="dln2 = dfch @ wT;  dw = ln2T @ dfch;  db = sum_n dfch"),
    Stage("fch_gelu", "gelu", ("fch",),
          forward="fch_gelu = gelu(fch)", backward="dfch = dfch_gelu * gelu'(fch)"),
    Stage("fcproj", "linear", ("fch_gelu",), "mlp.c_proj", dropout=True,
          forward="fcproj = fch_gelu @ mlp.c_proj.w + b",
          backward="dfch_gelu = dfcproj @ wT;  dw = fch_geluT @ dfcproj;  db = sum_n dfcproj"),
    Stage("out", "residual", ("x2", "fcproj"),
          forward="out = x2 + fcproj   (the next block's x)", backward="dx2 = dout;  dfcproj = dout"),
)


def stages() -> tuple:
    """The block's stages, read at call time (so a test can plant a change in BLOCK)."""
    return BLOCK


def params(st: Stage, prefix: str) -> tuple:
    """The HF names of a stage's parameters under prefix (h.{i}.): (weight, bias), or () for none."""
    return st.params(prefix)


def run(ops: dict, x):
    """The block's forward on x through ops: {op: f(stage, *inputs) -> output} -> the block's output."""
    values = {"x": x}
    for st in stages():
        values[st.out] = ops[st.op](st, *[values[n] for n in st.ins])
    return values["out"]


def split_heads(qkv_seq, n_heads):
    """qkv (L, 3d) of one sequence -> q, k, v each (H, L, hd), views (numpy_backend's attention does the same)."""
    L, three_d = qkv_seq.shape
    hd = three_d // 3 // n_heads
    return qkv_seq.reshape(L, 3, n_heads, hd).transpose(1, 2, 0, 3)
