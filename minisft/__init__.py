"""minisft: supervised instruction fine-tuning of GPT-2-class models with a hand-written engine.

Importing minisft never imports torch: backends are resolved by name only when a model asks.
"""
__version__ = "0.1.0"

from .batch import PackedBatch, pack_padded, pack_sequences  # noqa: E402
from .config import GPTConfig  # noqa: E402
from .model import GPT  # noqa: E402
from .optim import AdamW, clip_grad_norm  # noqa: E402

__all__ = ["GPT", "GPTConfig", "AdamW", "clip_grad_norm", "PackedBatch", "pack_padded", "pack_sequences",
           "__version__"]
