"""The tokenizers: GPT-2's (tiktoken's "gpt2" BPE) and a Hugging Face model's tokenizer.json (HFTokenizer).

End-of-text is token 50256; the training pipeline appends it after every example and pads with it.
Text never produces it: a literal "<|endoftext|>" inside a record is encoded as ordinary text
(`<`, `|`, `endoftext`, `|`, `>`), so data can never inject a control token or end an example
early. (tiktoken's default would refuse such text with an error; the book's pipeline would crash
on it.) Text without special-token strings encodes exactly as `tiktoken.get_encoding("gpt2").encode`.

The encoding is built from the vocabulary bundled with the package (minisft/assets/encoder.json),
so tokenizing never downloads and never writes tiktoken's cache.
"""
import copy
import functools
import hashlib
import json
from pathlib import Path
from collections.abc import Callable
from importlib.resources import files

import numpy as np
import tiktoken

from .config import GPTConfig
from .errors import MinisftError
from .files import write_text
from .pretrained import read_generation_config

EOT = 50256  # <|endoftext|>
VOCAB_FILE = files("minisft") / "assets" / "encoder.json"
VOCAB_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"  # tiktoken's expected hash
# GPT-2's pre-tokenizer: contractions, letter runs, digit runs, other symbols, whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def _byte_of_char() -> dict:
    """encoder.json spells bytes as printable characters (GPT-2's bytes_to_unicode): bytes that
    print as themselves stay; the other 68 are shifted to 256, 257, ... in byte order."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    shifted = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(shifted)}}


@functools.lru_cache(maxsize=1)
def gpt2() -> tiktoken.Encoding:
    """The tiktoken Encoding for GPT-2 (built once), identical to tiktoken.get_encoding("gpt2")."""
    raw = VOCAB_FILE.read_bytes()
    if hashlib.sha256(raw).hexdigest() != VOCAB_SHA256:
        raise MinisftError(f"{VOCAB_FILE}: the bundled GPT-2 vocabulary is damaged (sha256 mismatch); "
                           "reinstall minisft")
    byte_of = _byte_of_char()
    ranks = {bytes(byte_of[c] for c in token): rank for token, rank in json.loads(raw).items() if rank != EOT}
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=EOT + 1)


def encode(text: str) -> list:
    """Text -> token ids; special-token strings are plain text (see the module docstring)."""
    return gpt2().encode(text, disallowed_special=())


def decode(tokens) -> str:
    return gpt2().decode([int(t) for t in tokens])


def token_bytes(token: int) -> bytes:
    """The bytes one token stands for (a token may hold part of a UTF-8 character)."""
    return gpt2().decode_single_token_bytes(int(token))


def byte_starts(tokens, token_bytes=token_bytes) -> np.ndarray:
    """(L,) offset of each token's first byte in the UTF-8 text the tokens encode."""
    lengths = [len(token_bytes(t)) for t in tokens]
    starts = np.zeros(len(lengths), dtype=np.int64)  # (L,)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


class Tokenizer:
    """A model's tokenizer as the pipeline uses it: text <-> ids, each id's bytes (to place token
    boundaries in the text), the end-of-text id appended after every example (and padding), and the
    ids that end generation. GPT-2's is this class itself; a Hugging Face model's is HFTokenizer."""
    name = "gpt2"
    eos = EOT
    stops: tuple = (EOT,)
    vocab_size = EOT + 1
    # A chat template's rendering is the one text whose control-token strings are those tokens (what
    # transformers' apply_chat_template encodes); for_template gives the tokenizer that encodes it so.
    parse_specials = False
    bos_token: str | None = "<|endoftext|>"  # what a chat template sees as bos_token / eos_token
    eos_token = "<|endoftext|>"

    def encode(self, text: str) -> list:
        return gpt2().encode(text, allowed_special="all") if self.parse_specials else encode(text)

    def specials(self) -> tuple:
        """The strings that are control tokens when parse_specials is on."""
        return ("<|endoftext|>",)

    def for_template(self, stops=()) -> "Tokenizer":
        """This tokenizer for a chat template's text: control-token strings become their tokens, and
        generation also stops at `stops` (the template's end-of-turn token)."""
        tok = copy.copy(self)
        tok.parse_specials = True
        tok.stops = tuple(dict.fromkeys((*self.stops, *stops)))
        return tok

    def decode(self, tokens) -> str:
        return decode(tokens)

    def token_bytes(self, token: int) -> bytes:
        return token_bytes(token)

    def byte_starts(self, tokens) -> np.ndarray:
        return byte_starts(tokens, self.token_bytes)

    def save(self, folder) -> None:
        """Write the files a Hugging Face folder carries for this tokenizer (GPT-2's: none, every GPT-2
        reader knows its tokenizer)."""


GPT2 = Tokenizer()


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json (Llama 3, SmolLM2, Qwen: byte-level BPE) through the `tokenizers`
    library, torch-free. As for GPT-2, special-token strings inside text are encoded as plain text
    (encode_special_tokens), so data can never inject a control token; the end-of-text id is the
    folder's eos_token (tokenizer_config.json), generation also stops at generation_config.json's
    eos ids."""

    FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
             "chat_template.jinja")  # what an exported folder copies (those the source has)

    def __init__(self, folder, stops=()):
        folder = self.folder = Path(folder)
        try:
            import tokenizers
        except ImportError:
            raise MinisftError("reading tokenizer.json needs the `tokenizers` library: pip install "
                               "'minisft[llama]'") from None
        path = folder / "tokenizer.json"
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises its own exception type for every malformed file
            raise MinisftError(f"{path}: not a tokenizer.json the tokenizers library reads ({e})") from None
        self.tok.encode_special_tokens = True
        self.name = str(folder)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos, self.bos_token = self._eos(folder / "tokenizer_config.json")
        self.eos_token = self.tok.id_to_token(self.eos)
        self.stops = tuple(dict.fromkeys((self.eos, *stops)))
        decoder = json.loads(path.read_text(encoding="utf-8")).get("decoder") or {}
        self.byte_level = decoder.get("type") == "ByteLevel"
        self.byte_of = _byte_of_char()

    def _eos(self, config) -> tuple[int, str | None]:
        """(the eos id, the bos_token string or None) of tokenizer_config.json."""
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
            eos, bos = cfg.get("eos_token"), cfg.get("bos_token")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise MinisftError(f"{config}: cannot read the tokenizer config ({e})") from None
        eos, bos = (t.get("content") if isinstance(t, dict) else t for t in (eos, bos))
        eos_id = self.tok.token_to_id(eos) if isinstance(eos, str) else None
        if eos_id is None:
            raise MinisftError(f"{config}: eos_token {eos!r} is not a token of tokenizer.json")
        return eos_id, bos if isinstance(bos, str) else None

    def specials(self) -> tuple:
        return tuple(t.content for t in self.tok.get_added_tokens_decoder().values() if t.content)

    def for_template(self, stops=()) -> "HFTokenizer":
        tok = super().for_template(stops)
        assert isinstance(tok, HFTokenizer)
        tok.tok = type(self.tok).from_str(self.tok.to_str())  # its own copy: the flag is the library object's
        tok.tok.encode_special_tokens = False
        return tok

    def save(self, folder) -> None:
        for name in self.FILES:
            if (self.folder / name).is_file():
                write_text(Path(folder) / name, (self.folder / name).read_text(encoding="utf-8"))

    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, tokens) -> str:
        return self.tok.decode([int(t) for t in tokens], skip_special_tokens=False)

    def token_bytes(self, token: int) -> bytes:
        piece = self.tok.id_to_token(int(token))
        if self.byte_level and piece is not None and all(c in self.byte_of for c in piece):
            return bytes(self.byte_of[c] for c in piece)  # GPT-2's byte-to-character spelling, undone
        return self.decode([token]).encode("utf-8")


class TextPieces:
    """The decoded text of a growing list of tokens, handed out in pieces that never split a UTF-8
    character. A character can span several tokens: until its last byte arrives, decode(tokens)
    ends in replacement characters, and that tail is held back."""

    def __init__(self, decode: Callable[[list], str]):
        self.decode = decode
        self.tokens: list[int] = []
        self.text = ""        # decode(tokens)
        self.released = 0     # how much of text the pieces so far hold

    def add(self, token: int) -> int:
        """Append token -> the length of the text that is final (all but a partial character at its end)."""
        self.tokens.append(token)
        self.text = self.decode(self.tokens)
        return len(self.text.rstrip("\ufffd"))

    def release(self, end: int) -> str:
        """The next piece: the text from the end of the pieces released so far up to end."""
        out, self.released = self.text[self.released:end], max(self.released, end)
        return out


def for_model(cfg, folder) -> Tokenizer:
    """The tokenizer of a model: GPT-2's for a GPT-2 shape, else the folder's tokenizer.json (its
    generation_config.json's eos ids also stop generation)."""
    if isinstance(cfg, GPTConfig):
        return GPT2
    if folder is None or not (Path(folder) / "tokenizer.json").is_file():
        raise MinisftError(f"{folder or 'the model'}: a {type(cfg).__name__} model needs its tokenizer.json "
                           "(give --weights a Hugging Face folder that has one)")
    stops = read_generation_config(folder)
    tok = HFTokenizer(folder, stops)
    if tok.vocab_size > cfg.vocab_size:
        raise MinisftError(f"{folder}/tokenizer.json has {tok.vocab_size} tokens, the model's vocabulary "
                           f"{cfg.vocab_size}")
    return tok
