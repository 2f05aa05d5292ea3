"""Numbers the kernels share with the model layer, defined once here so that a backend depends on
nothing above it (minisft.batch, minisft.config and minisft.memory import them from here)."""

IGNORE_INDEX = -100     # a target that takes no loss (prompt tokens, padding), as torch's cross_entropy
LN_EPS = 1e-5           # GPT-2's layernorm epsilon (HF layer_norm_epsilon)
# Logits held at once by the numba head: 128 MiB (652 rows x 50257 float32); minisft.memory counts
# it as the head's chunk (the numpy and torch heads hold fewer rows).
HEAD_CHUNK_BYTES = 128 * 2**20
# Bytes per element of the arrays a run stores (weights, gradients, activations) for each dtype
# setting: bfloat16 is mixed precision, its store stays float32.
STORE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 4}
