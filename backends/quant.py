"""Lean AdamW state: the number formats every backend's lean AdamW kernels share.

bfloat16 moments (`--optim-state bf16`): m and v kept as bfloat16 (the top 16 bits of a float32),
rounded stochastically: a value between two bfloat16 neighbours goes to the upper one with
probability equal to its distance from the lower one, so the rounding is unbiased. Round-to-nearest
would stall v: with beta2 = 0.999 each step changes v by 0.1%, less than half a bfloat16 step
(0.2-0.4%), so v could neither grow slowly nor decay. The random bits are a hash of (step, tensor,
element, moment), not an RNG stream: no state to checkpoint, and every backend draws the same bits.

8-bit moments (`--optim-state 8bit`), the block-wise scheme of Dettmers et al., "8-bit Optimizers via
Block-wise Quantization" (2021): each tensor is cut into blocks of BLOCK values; a block stores one
float32 scale (its largest magnitude) and one byte per value, the index of the nearest entry of a
256-entry code for value / scale. The codes are "dynamic": a run of leading zero bits picks a decade
(1e-6 ... 1), the remaining bits split that decade linearly, so small values keep relative
precision. m uses the signed code. For v the kernels store sqrt(v) on the unsigned code (all 8 bits
for magnitude): the code spans 7 decades of sqrt(v), i.e. 14 decades of v, which keeps v's range,
and sqrt(v) is what the update divides by. Every update dequantizes a block, runs AdamW on it in
float32 against the float32 master weights, and quantizes the new moments with the block's new scale.

Round-trip error bound (tested): a value x in a block of scale s comes back as s * code[q] with
|x - s code[q]| <= s * (half the gap between the two codes around x / s) + s * 2^-22, the last term
covering the float32 rounding of x / s; the signed code has no -1, so x / s in [-1, -0.993) is off
by its distance to the lowest code. For the signed code that is at most 0.71% of s for |x| >= 0.1 s,
and 0.71% of the decade's top value inside each lower decade.
"""
import numpy as np

BLOCK = 2048            # values per quantization block: one float32 scale each
MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B1     # odd multiplier spreading element indices (2^32 / golden ratio)
ROUND_BITS = 16         # float32 bits below the bfloat16 mantissa: the stochastic rounding's draw


def dynamic_code(signed: bool) -> np.ndarray:
    """The 256 sorted float32 values of the dynamic code. Decade k (k = 0 the smallest) covers
    [0.1, 1] x 10^(k-6) with the midpoints of 2^k (signed) or 2^(k+1) (unsigned) equal steps;
    then 0 and 1 exactly; the signed code mirrors its positive midpoints below 0."""
    values = [0.0, 1.0]
    for k in range(7):
        n = 2 ** k if signed else 2 ** (k + 1)
        edges = np.linspace(0.1, 1.0, n + 1)
        mids = 10.0 ** (k - 6) * (edges[:-1] + edges[1:]) / 2
        values += list(mids) + (list(-mids) if signed else [])
    code = np.sort(np.array(values)).astype(np.float32)
    assert code.shape == (256,) and len(np.unique(code)) == 256
    return code


def midpoints(code: np.ndarray) -> np.ndarray:
    """(255,) float32 decision boundaries: x / s quantizes to the number of midpoints below it."""
    return ((code[:-1].astype(np.float64) + code[1:]) / 2).astype(np.float32)


M_CODE = dynamic_code(signed=True)     # (256,) first moments
V_CODE = dynamic_code(signed=False)    # (256,) square roots of the second moments
M_MID, V_MID = midpoints(M_CODE), midpoints(V_CODE)


def n_blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


def round_salt(step: int, key: int, moment: int) -> int:
    """The per-(step, tensor, moment) 32-bit salt of the stochastic rounding hash; key numbers the
    tensor, moment is 0 for m and 1 for v."""
    return fmix32((step * 0x85EBCA77 + key * 2 + moment) & MASK32)


def fmix32(x):
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2.
    Works on Python ints and on uint64/int64 arrays holding 32-bit values (products wrap, masked)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & MASK32
    return x ^ (x >> 16)


# ---- numpy reference formats (the numpy backend's kernels and the tests use these) ---------------
def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> the float32 values they stand for (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def bf16_round(x: np.ndarray, salt: int) -> np.ndarray:
    """float32 (n,) -> uint16 bfloat16 bits, rounded stochastically with element i's draw
    fmix32(i * GOLDEN + salt) >> 16: adding 16 random bits below the cut rounds the magnitude up
    with probability equal to the dropped fraction (sign-magnitude format: both signs alike)."""
    i = np.arange(x.size, dtype=np.uint64)                                # (n,)
    r = fmix32((i * np.uint64(GOLDEN) + np.uint64(salt)) & np.uint64(MASK32)) >> np.uint64(ROUND_BITS)
    u = x.view(np.uint32).astype(np.uint64)                               # (n,)
    return (((u + r) >> np.uint64(ROUND_BITS)) & np.uint64(0xFFFF)).astype(np.uint16)


def quantize(x: np.ndarray, code: np.ndarray, mid: np.ndarray):
    """float32 (n,) -> codes uint8 (n,), scales float32 (n_blocks,): per block the largest
    magnitude, and per value the nearest code entry to x / scale (an all-zero block divides by 1)."""
    starts = np.arange(0, x.size, BLOCK)
    scale = np.maximum.reduceat(np.abs(x), starts).astype(np.float32)    # (n_blocks,)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    norm = x / np.repeat(safe, BLOCK)[:x.size]                            # (n,) in [-1, 1]
    return np.searchsorted(mid, norm, side="left").astype(np.uint8), scale


def dequantize(q: np.ndarray, scale: np.ndarray, code: np.ndarray) -> np.ndarray:
    """codes (n,), scales (n_blocks,) -> float32 (n,)."""
    return code[q] * np.repeat(scale, BLOCK)[:q.size]
