"""Prompt styles: exact renderings, training text vs inference prompt, and multi-turn masking."""
import numpy as np
import pytest

from minisft.data import format_input, normalize_record
from minisft.errors import MinisftError
from minisft.prompts import STYLES, get_style, tokenize_segments
from minisft.tokenizer import EOT, decode, encode

ENTRY_50 = {"instruction": "Identify the correct spelling of the following word.", "input": "Ocassion",
            "output": "The correct spelling is 'Occasion.'"}
ENTRY_999 = {"instruction": "What is an antonym of 'complicated'?", "input": "",
             "output": "An antonym of 'complicated' is 'simple'."}
CHAT = {"messages": [
    {"role": "system", "content": "You answer in one sentence."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven is prime."},
    {"role": "user", "content": "And an even one?"},
    {"role": "assistant", "content": "Two is the only even prime."},
]}
RECORDS = [ENTRY_50, ENTRY_999, CHAT, {"messages": CHAT["messages"][1:]}]


def messages(rec):
    return normalize_record(rec)["messages"]


def test_phi3_is_the_books_exercise_7_1():
    phi3 = STYLES["phi3"]
    assert phi3.training_text(messages(ENTRY_999)) == \
        "<|user|>\nWhat is an antonym of 'complicated'?\n<|assistant|>\nAn antonym of 'complicated' is 'simple'."
    assert phi3.training_text(messages(ENTRY_50)) == ("<|user|>\nIdentify the correct spelling of the following "
                                                      "word.\nOcassion\n<|assistant|>\nThe correct spelling is "
                                                      "'Occasion.'")
    assert format_input(ENTRY_50, style="phi3") == \
        "<|user|>\nIdentify the correct spelling of the following word.\nOcassion"
    assert phi3.prompt(messages(ENTRY_999)) == "<|user|>\nWhat is an antonym of 'complicated'?\n<|assistant|>\n"


def test_chatml_single_and_multi_turn():
    chatml = STYLES["chatml"]
    assert chatml.training_text(messages(ENTRY_999)) == (
        "<|im_start|>user\nWhat is an antonym of 'complicated'?<|im_end|>\n"
        "<|im_start|>assistant\nAn antonym of 'complicated' is 'simple'.<|im_end|>")
    assert chatml.training_text(messages(CHAT)) == (
        "<|im_start|>system\nYou answer in one sentence.<|im_end|>\n"
        "<|im_start|>user\nName a prime number.<|im_end|>\n"
        "<|im_start|>assistant\nSeven is prime.<|im_end|>\n"
        "<|im_start|>user\nAnd an even one?<|im_end|>\n"
        "<|im_start|>assistant\nTwo is the only even prime.<|im_end|>")
    assert chatml.prompt(messages(CHAT)).endswith(
        "<|im_start|>assistant\nSeven is prime.<|im_end|>\n<|im_start|>user\nAnd an even one?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_alpaca_multi_turn_and_system():
    alpaca = STYLES["alpaca"]
    assert alpaca.training_text(messages(CHAT)) == (
        "You answer in one sentence.\n\n### Instruction:\nName a prime number.\n\n### Response:\nSeven is prime."
        "\n\n### Instruction:\nAnd an even one?\n\n### Response:\nTwo is the only even prime.")
    assert alpaca.training_text(messages({"messages": CHAT["messages"][1:3]})) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a prime number.\n\n### Response:\nSeven is prime.")


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("rec", RECORDS, ids=["entry50", "entry999", "chat", "chat-no-system"])
def test_training_text_is_prompt_plus_answer(style, rec):
    """One rendering: the inference prompt is the training text up to the last answer, ending with
    the response header, and a record without its answer renders the same prompt."""
    s = get_style(style)
    msgs = messages(rec)
    answer = msgs[-1]["content"] + s.response_end
    assert s.training_text(msgs) == s.prompt(msgs) + answer
    assert s.prompt(msgs) == s.format_input(msgs) + s.header
    assert s.prompt(msgs[:-1]) == s.prompt(msgs)
    assert format_input(rec, style) == s.format_input(msgs)


@pytest.mark.parametrize("style", list(STYLES))
def test_multi_turn_masking_trains_only_the_assistant_turns(style):
    s = get_style(style)
    segs = s.segments(messages(CHAT))
    assert [kind for _, kind in segs] == ["prompt", "header", "response"] * 2
    for mask, kinds in [("header", {"response"}), ("input", {"header", "response"})]:
        tokens, trained = tokenize_segments(segs, mask)
        assert decode(tokens[trained]) == "".join(text for text, kind in segs if kind in kinds)
        assert decode(tokens) == s.training_text(messages(CHAT))
    tokens, trained = tokenize_segments(segs, "none")
    assert not trained[0] and trained[1:].all()


def test_header_mask_token_by_token_on_chatml():
    segs = STYLES["chatml"].segments(messages(CHAT))
    tokens, trained = tokenize_segments(segs, "header")
    # the trained tokens come in exactly two runs: the two assistant turns
    edges = np.flatnonzero(np.diff(np.r_[0, trained.astype(int), 0]))  # run starts and ends
    runs = [tokens[a:b] for a, b in zip(edges[::2], edges[1::2])]
    assert [decode(r) for r in runs] == ["Seven is prime.<|im_end|>", "Two is the only even prime.<|im_end|>"]


def test_literal_endoftext_is_plain_text():
    text = "Say <|endoftext|> please"
    ids = encode(text)
    assert EOT not in ids and decode(ids) == text
    segs = STYLES["alpaca"].segments(messages({"instruction": text, "output": "no <|endoftext|> here"}))
    tokens, trained = tokenize_segments(segs, "header")
    assert EOT not in tokens.tolist()
    assert decode(tokens[trained]) == "no <|endoftext|> here"


def test_non_ascii_text_masks_on_byte_boundaries():
    rec = {"instruction": "Übersetze: Straße", "input": "日本語", "output": "café — naïve 🙂"}
    segs = STYLES["alpaca"].segments(messages(rec))
    tokens, trained = tokenize_segments(segs, "header")
    assert decode(tokens[trained]) == "café — naïve 🙂"
    assert np.array_equal(tokens, encode(STYLES["alpaca"].training_text(messages(rec))))


def test_unknown_style_and_mask():
    with pytest.raises(MinisftError, match="unknown prompt style 'llama'"):
        get_style("llama")
    with pytest.raises(MinisftError, match="unknown mask 'all'"):
        tokenize_segments([("a", "prompt")], "all")
