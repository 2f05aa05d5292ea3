"""GPTConfig: the shape of a GPT-2-class model, with the four OpenAI sizes and a tiny one as presets."""
from dataclasses import asdict, dataclass, fields

GPT2_VOCAB = 50257


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = GPT2_VOCAB
    context_length: int = 1024
    emb_dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    # False = the book's model: the output head `lm_head.weight` is its own tensor (it starts as a
    # copy of wte when loading OpenAI weights, then trains separately). True = original GPT-2, where
    # the head is wte itself. Every preset is untied, as the book fine-tunes.
    tie_embeddings: bool = False

    def __post_init__(self):
        for f in ("vocab_size", "context_length", "emb_dim", "n_layers", "n_heads"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise ValueError(f"GPTConfig.{f} must be a positive integer, got {getattr(self, f)!r}")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"GPTConfig: emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"GPTConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


PRESETS = {
    "gpt2-small": dict(emb_dim=768, n_layers=12, n_heads=12),     # 124M
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),   # 355M
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),    # 774M
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),       # 1558M
    # Real GPT-2 vocabulary and tokenizer, tiny body: the offline first run and smoke tests.
    "gpt2-tiny": dict(context_length=256, emb_dim=64, n_layers=2, n_heads=4),
}
