"""The GPT-2 tokenizer (tiktoken's "gpt2" BPE) as minisft uses it.

End-of-text is token 50256; the training pipeline appends it after every example and pads with it.
Text never produces it: a literal "<|endoftext|>" inside a record is encoded as ordinary text
(`<`, `|`, `endoftext`, `|`, `>`), so data can never inject a control token or end an example
early. (tiktoken's default would refuse such text with an error; the book's pipeline would crash
on it.) Text without special-token strings encodes exactly as `tiktoken.get_encoding("gpt2").encode`.

Offline use: point TIKTOKEN_CACHE_DIR at a folder holding tiktoken's cached GPT-2 files.
"""
import functools

import numpy as np

from .errors import MinisftError

EOT = 50256  # <|endoftext|>


@functools.lru_cache(maxsize=1)
def gpt2():
    """The tiktoken Encoding for GPT-2 (loaded once)."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests/OS errors when it cannot fetch its files
        raise MinisftError(f"could not load the GPT-2 tokenizer ({type(e).__name__}: {e}); offline, set "
                           "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached gpt2 files") from e


def encode(text: str) -> list:
    """Text -> token ids; special-token strings are plain text (see the module docstring)."""
    return gpt2().encode(text, disallowed_special=())


def decode(tokens) -> str:
    return gpt2().decode([int(t) for t in tokens])


def token_bytes(token: int) -> bytes:
    """The bytes one token stands for (a token may hold part of a UTF-8 character)."""
    return gpt2().decode_single_token_bytes(int(token))


def byte_starts(tokens) -> np.ndarray:
    """(L,) offset of each token's first byte in the UTF-8 text the tokens encode."""
    lengths = [len(token_bytes(t)) for t in tokens]
    starts = np.zeros(len(lengths), dtype=np.int64)  # (L,)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts
