"""Shared test fixtures: the data files the tests read, all inside the repository (tests/data/ and the
package's own assets), and the reference GPT-2 tokenizer built from them. Nothing here reads outside
the repository or the network."""
import json
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


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory):
    """A tiny random Llama-family folder as --weights DIR reads it: config.json + model.safetensors written
    by transformers (grouped K/V heads, tied head), and a byte-level BPE tokenizer.json trained here on
    the book's data with the `tokenizers` library."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    folder = tmp_path_factory.mktemp("tiny-llama")
    texts = [" ".join(str(v) for v in r.values()) for r in json.loads(BOOK_DATA.read_text(encoding="utf-8"))]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                               "tokenizer_class": "PreTrainedTokenizerFast"}))
    conf = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=512, tie_word_embeddings=True,
                                    eos_token_id=tok.token_to_id("<|endoftext|>"))
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(conf).save_pretrained(folder)
    return folder
