"""Shared test fixtures: the data files the tests read, all inside the repository (tests/data/ and the
package's own assets), and the reference GPT-2 tokenizer built from them. Nothing here reads outside
the repository or the network."""
import os
from pathlib import Path

import pytest
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "tests" / "data"  # small files from the book's repository (tests/data/README.md)
BOOK_DATA = ROOT / "minisft" / "assets" / "instruction-data.json"  # the book's 1,100 records, as bundled

# tiktoken never caches: a test that reaches for tiktoken.get_encoding would download, and fails offline.
os.environ["TIKTOKEN_CACHE_DIR"] = ""


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def book_data() -> Path:
    return BOOK_DATA


@pytest.fixture(scope="session")
def tiktoken_gpt2() -> tiktoken.Encoding:
    """tiktoken's own "gpt2" encoding, built the way tiktoken_ext.openai_public.gpt2 builds it (from
    OpenAI's vocab.bpe merges and encoder.json, hash-checked), from local copies instead of the network:
    an independent reference for minisft.tokenizer, which reads encoder.json alone."""
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(DATA_DIR / "vocab.bpe"), encoder_json_file=str(ROOT / "minisft" / "assets" / "encoder.json"),
        vocab_bpe_hash="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        encoder_json_hash="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783")
    return tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
