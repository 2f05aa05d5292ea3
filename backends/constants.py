"""Numbers the kernels share with the model layer, defined once here so that a backend depends on
nothing above it (minisft.batch, minisft.config and minisft.memory import them from here)."""

IGNORE_INDEX = -100     # a target that takes no loss (prompt tokens, padding), as torch's cross_entropy
LN_EPS = 1e-5           # GPT-2's layernorm epsilon (HF layer_norm_epsilon)
# Logits held at once by the numba head: 128 MiB (652 rows x 50257 float32); minisft.memory counts
# it as the head's chunk (the numpy and torch heads hold fewer rows).
HEAD_CHUNK_BYTES = 128 * 2**20
# The element type of the arrays a run stores (weights, gradients, optimizer state, the residual
# stream) for each dtype setting: bfloat16 is mixed precision, its store stays float32.
STORE_DTYPES = {"float32": "float32", "float64": "float64", "bfloat16": "float32"}
