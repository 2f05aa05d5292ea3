"""minisft.data against the book's chapter 7: prompts, split, collate, masking, packing, loader."""
import json

import numpy as np
import pytest

from minisft import GPT, GPTConfig, pack_padded
from minisft.data import (Example, Loader, collate_examples, collate_packed, collate_padded, encode_record,
                          encode_records, format_input, load_records, split_dataset)
from minisft.errors import MinisftError
from tests.helpers import book_format_input, book_training_text


# ---- the book's definitions, written out from the chapter's text, to check against ----------------------

@pytest.fixture(scope="module")
def raw(book_data):
    return json.loads(book_data.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def records(book_data):
    return load_records(book_data)


# ---- prompts ----------------------------------------------------------------------------------------

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")


def test_book_strings_data_50_and_999_byte_exact(raw, records):
    want_50 = (PREAMBLE + "\n\n### Instruction:\nIdentify the correct spelling of the following word."
               "\n\n### Input:\nOcassion")
    want_999 = PREAMBLE + "\n\n### Instruction:\nWhat is an antonym of 'complicated'?"
    assert book_format_input(raw[50]) == want_50
    assert book_format_input(raw[999]) == want_999
    # format_input takes the raw Alpaca entry and the loaded (internal) record alike
    for entry in (raw[50], records[50]):
        assert format_input(entry) == want_50
    for entry in (raw[999], records[999]):
        assert format_input(entry) == want_999
        assert format_input(entry, style="alpaca") == want_999

    from minisft.prompts import STYLES
    alpaca = STYLES["alpaca"]
    assert alpaca.training_text(records[50]["messages"]) == \
        want_50 + "\n\n### Response:\nThe correct spelling is 'Occasion.'"
    assert alpaca.training_text(records[999]["messages"]) == \
        want_999 + "\n\n### Response:\nAn antonym of 'complicated' is 'simple'."
    assert alpaca.prompt(records[999]["messages"]) == want_999 + "\n\n### Response:\n"


def test_every_record_renders_and_tokenizes_as_the_book(raw, records, tiktoken_gpt2):
    from minisft.prompts import STYLES
    assert len(records) == len(raw) == 1100
    for entry, rec in zip(raw, records):
        text = STYLES["alpaca"].training_text(rec["messages"])
        assert format_input(entry) == book_format_input(entry)
        assert text == book_training_text(entry)
        assert encode_record(rec).tokens.tolist() == tiktoken_gpt2.encode(text)


def test_masks_match_the_books_token_counts_on_every_record(raw, records, tiktoken_gpt2):
    """input: the book's exercise 7.2 masks len(encode(format_input)) tokens; header: TRL's
    convention masks through the response header, len(encode(format_input + header))."""
    for entry, rec in zip(raw, records):
        n_input = len(tiktoken_gpt2.encode(book_format_input(entry)))
        n_header = len(tiktoken_gpt2.encode(book_format_input(entry) + "\n\n### Response:\n"))
        positions = np.arange(len(encode_record(rec).tokens))
        assert encode_record(rec, mask="input").trained.tolist() == (positions >= n_input).tolist()
        assert encode_record(rec, mask="header").trained.tolist() == (positions >= n_header).tolist()
        assert encode_record(rec, mask="none").trained.tolist() == (positions >= 1).tolist()


def test_masking_both_ways_on_data_50_token_by_token(records, tiktoken_gpt2):
    tokens = encode_record(records[50], mask="none").tokens
    assert len(tokens) == 57
    for mask, n_masked, trained_text in [
        ("input", 43, ["\n", "\n", "###", " Response", ":", "\n",
                       "The", " correct", " spelling", " is", " '", "Occ", "asion", ".'"]),
        ("header", 49, ["The", " correct", " spelling", " is", " '", "Occ", "asion", ".'"]),
    ]:
        ex = encode_record(records[50], mask=mask)
        assert ex.tokens.tolist() == tokens.tolist()  # masking never changes the tokens
        assert ex.trained.tolist() == [False] * n_masked + [True] * (57 - n_masked)
        assert [tiktoken_gpt2.decode([t]) for t in ex.tokens[ex.trained]] == trained_text
    # the prompt part is exactly the book's format_input, token for token
    assert tiktoken_gpt2.decode(tokens[:43].tolist()) == format_input(records[50])


# ---- split ------------------------------------------------------------------------------------------

def test_book_split_sizes_and_order(raw):
    split = split_dataset(raw)
    assert (len(split.train), len(split.val), len(split.test)) == (935, 55, 110)
    assert split.train == raw[:935]
    assert split.test == raw[935:1045]
    assert split.val == raw[1045:]


def test_seeded_shuffle_split_is_deterministic_and_a_permutation():
    data = list(range(1100))
    a, b, c = split_dataset(data, shuffle_seed=7), split_dataset(data, shuffle_seed=7), split_dataset(data, 8)
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    assert a.train != c.train
    assert (len(a.train), len(a.val), len(a.test)) == (935, 55, 110)
    assert sorted(a.train + a.val + a.test) == data
    assert a.train != data[:935]


# ---- the book's collate ---------------------------------------------------------------------------------

def test_book_collate_example_exact():
    inputs, targets = collate_padded([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.dtype == np.int64 and targets.dtype == np.int64
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]


def test_book_collate_allowed_max_length_and_custom_ids():
    inputs, targets = collate_padded([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, 50256], [7, 8, 9]]
    assert targets.tolist() == [[1, 2, 3], [6, 50256, -100], [8, 9, 50256]]
    inputs, targets = collate_padded([[3, 4], [5]], pad_token_id=0, ignore_index=-1)
    assert inputs.tolist() == [[3, 4], [5, 0]]
    assert targets.tolist() == [[4, 0], [0, -1]]


def test_book_collate_quirk_pad_id_inside_the_text():
    """Like the book, the first 50256 among the targets is kept wherever it is, so a 50256 in the
    item itself is kept and the real end-of-text after it is ignored."""
    inputs, targets = collate_padded([[1, 50256, 2], [3, 4, 5, 6, 7]])
    assert inputs.tolist() == [[1, 50256, 2, 50256, 50256], [3, 4, 5, 6, 7]]
    assert targets.tolist() == [[50256, 2, -100, -100, -100], [4, 5, 6, 7, 50256]]


def test_masked_collate_is_the_books_exercise_7_2(raw, records, tiktoken_gpt2):
    batch = list(range(20, 28))
    exs = [encode_record(records[i], mask="input") for i in batch]
    inputs, targets = collate_padded([e.tokens for e in exs], trained=[e.trained for e in exs])
    plain_inputs, want = collate_padded([tiktoken_gpt2.encode(book_training_text(raw[i])) for i in batch])
    for row, i in enumerate(batch):  # exercise 7.2: targets[:instruction_length - 1] = -100
        want[row, :len(tiktoken_gpt2.encode(book_format_input(raw[i]))) - 1] = -100
    assert np.array_equal(inputs, plain_inputs)
    assert np.array_equal(targets, want)


# ---- packed == padded ---------------------------------------------------------------------------------

def assert_packed_equal(a, b):
    for field in ("tokens", "targets", "positions", "cu_seqlens"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field


@pytest.mark.parametrize("mask", ["none", "input", "header"])
@pytest.mark.parametrize("allowed_max_length", [None, 50])
def test_packed_batch_holds_the_padded_batchs_pairs(records, mask, allowed_max_length):
    rng = np.random.default_rng(0)
    exs = [encode_record(records[i], mask=mask) for i in rng.choice(len(records), size=8, replace=False)]
    tokens, trained = [e.tokens for e in exs], [e.trained for e in exs]
    inputs, targets = collate_padded(tokens, allowed_max_length=allowed_max_length, trained=trained)
    packed = collate_packed(tokens, allowed_max_length=allowed_max_length, trained=trained)
    assert_packed_equal(packed, pack_padded(inputs, targets))
    # every (input, target) pair the padded batch trains on is in the packed one, in order, and no other
    valid = targets != -100
    assert packed.num_valid == valid.sum()
    assert np.array_equal(packed.tokens[packed.targets != -100], inputs[valid])
    assert np.array_equal(packed.targets[packed.targets != -100], targets[valid])
    assert packed.num_tokens < inputs.size  # and the padding is gone


def test_packed_equals_padded_with_the_quirk_and_empty_rows():
    batch = [[1, 50256, 2], [3, 4, 5, 6, 7], [8, 9]]
    trained = [np.array([0, 1, 1], bool), np.array([0, 0, 0, 1, 1], bool), np.array([0, 0], bool)]
    for allowed in (None, 2, 3):
        inputs, targets = collate_padded(batch, allowed_max_length=allowed, trained=trained)
        assert_packed_equal(collate_packed(batch, allowed_max_length=allowed, trained=trained),
                            pack_padded(inputs, targets))
    # with length 2 the third row trains nothing (its end-of-text is cut off) and is dropped
    assert collate_packed(batch, allowed_max_length=2, trained=trained).num_seqs == 2


@pytest.mark.parametrize("mask", ["none", "header"])
def test_packed_and_padded_give_the_same_loss_and_gradients(records, mask):
    """A tiny GPT in float64: the book's padded batch and the packed batch agree to rounding."""
    exs = [encode_record(records[i], mask=mask) for i in (3, 50, 999, 17)]
    inputs, targets = collate_padded([e.tokens for e in exs], trained=[e.trained for e in exs])
    packed = collate_examples(exs, packed=True)
    cfg = GPTConfig(vocab_size=50257, context_length=128, emb_dim=16, n_layers=1, n_heads=2)
    model = GPT(cfg, dtype="float64", seed=1)
    loss_padded, grads_padded = model.loss_and_grad(inputs, targets)
    model.zero_grad()
    loss_sum, n_valid = model.forward_backward(packed)
    assert n_valid == np.count_nonzero(targets != -100)
    assert abs(loss_sum / n_valid - loss_padded) <= 1e-12 * abs(loss_padded)
    for name, g in grads_padded.items():
        np.testing.assert_allclose(model.B.to_numpy(model.grads[name]), g, rtol=1e-12, atol=1e-16, err_msg=name)


# ---- the loader ---------------------------------------------------------------------------------------

def ids(batch):
    return [int(e) for e in batch]


def test_loader_follows_the_books_dataloader_rules():
    data = list(range(935))
    train = Loader(data, batch_size=8, shuffle=True, drop_last=True, seed=123, collate=ids)
    val = Loader(list(range(55)), batch_size=8, shuffle=False, drop_last=False, collate=ids)
    assert len(train) == 116 and len(val) == 7
    epoch0, epoch1 = list(train), list(train)
    assert len(epoch0) == 116 and all(len(b) == 8 for b in epoch0)
    seen = sum(epoch0, [])
    assert len(set(seen)) == 928 and set(seen) <= set(data)  # a permutation with the last 7 dropped
    assert epoch0 != epoch1  # every epoch its own order
    assert seen != sorted(seen)
    val_batches = list(val)
    assert sum(val_batches, []) == list(range(55)) and [len(b) for b in val_batches] == [8] * 6 + [7]
    assert list(val) == val_batches  # no shuffle: every epoch the same
    again = Loader(data, batch_size=8, shuffle=True, drop_last=True, seed=123, collate=ids)
    assert list(again) == epoch0 and list(again) == epoch1
    other = Loader(data, batch_size=8, shuffle=True, drop_last=True, seed=124, collate=ids)
    assert list(other) != epoch0


def test_loader_resumes_with_the_same_remaining_batches():
    data = list(range(100))
    make = lambda: Loader(data, batch_size=7, shuffle=True, drop_last=True, seed=5, collate=ids)  # noqa: E731
    reference = make()
    want = [list(reference) for _ in range(3)]  # 3 epochs, uninterrupted

    run = make()
    list(run)  # epoch 0
    got_before = []
    for batch in run:  # stop after 4 batches of epoch 1
        got_before.append(batch)
        if len(got_before) == 4:
            break
    state = json.loads(json.dumps(run.state_dict()))
    assert state["epoch"] == 1 and state["batch"] == 4

    resumed = make()
    resumed.seed = 999  # the seed comes back from the state
    resumed.load_state_dict(state)
    assert got_before + list(resumed) == want[1]
    assert list(resumed) == want[2]


def test_loader_state_from_a_different_setup_is_refused():
    state = Loader(list(range(10)), 2, True, True).state_dict()
    with pytest.raises(MinisftError, match="batch_size=2"):
        Loader(list(range(10)), 3, True, True).load_state_dict(state)
    with pytest.raises(MinisftError, match="num_examples=10"):
        Loader(list(range(11)), 2, True, True).load_state_dict(state)
    with pytest.raises(MinisftError, match="batch size"):
        Loader(list(range(10)), 0, True, True)


def test_loader_yields_packed_batches_of_examples(records):
    exs = encode_records(records[:20], mask="header")
    loader = Loader(exs, batch_size=4, shuffle=False, drop_last=False)
    first = next(iter(loader))
    assert_packed_equal(first, collate_packed([e.tokens for e in exs[:4]], trained=[e.trained for e in exs[:4]]))
    assert isinstance(exs[0], Example)


# ---- loading and validation -------------------------------------------------------------------------

ALPACA = {"instruction": "Say hi.", "input": "", "output": "Hi."}


def write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def test_formats_load_into_one_form(tmp_path):
    user_assistant = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]
    alpaca_form = [{"role": "user", "content": "Say hi.", "input": ""}, {"role": "assistant", "content": "Hi."}]
    sharegpt = {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]}
    openai = {"messages": user_assistant}
    assert load_records(write(tmp_path, "a.json", [ALPACA])) == [{"messages": alpaca_form}]
    assert load_records(write(tmp_path, "s.json", [sharegpt])) == [{"messages": user_assistant}]
    assert load_records(write(tmp_path, "o.json", [openai])) == [{"messages": user_assistant}]
    jsonl = "\n".join(json.dumps(r) for r in (ALPACA, sharegpt, openai)) + "\n\n"
    mixed = load_records(write(tmp_path, "m.jsonl", jsonl))
    assert mixed == [{"messages": alpaca_form}, {"messages": user_assistant}, {"messages": user_assistant}]
    assert load_records(write(tmp_path, "m.json", jsonl)) == mixed  # several top-level values: JSON Lines
    assert load_records(write(tmp_path, "bom.json", b"\xef\xbb\xbf" + json.dumps([ALPACA]).encode())) == \
        [{"messages": alpaca_form}]
    # the internal form loads as itself; an Alpaca record without input gets ""
    assert load_records(write(tmp_path, "i.json", [{"messages": alpaca_form}])) == [{"messages": alpaca_form}]
    no_input = load_records(write(tmp_path, "n.json", [{"instruction": "Say hi.", "output": "Hi."}]))
    assert no_input == [{"messages": alpaca_form}]


def test_multi_turn_sharegpt_with_system(tmp_path):
    rec = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello."}, {"from": "human", "value": "Bye"},
                             {"from": "gpt", "value": "Bye."}]}
    [got] = load_records(write(tmp_path, "c.json", [rec]))
    assert [m["role"] for m in got["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    empty_system = {"conversations": [{"from": "system", "value": ""}] + rec["conversations"][1:3]}
    [got] = load_records(write(tmp_path, "e.json", [empty_system]))
    assert [m["role"] for m in got["messages"]] == ["user", "assistant"]


BAD_FILES = [
    # (file name, content, what the message must say)
    ("broken.json", '[{"instruction": "a", "output": "b"},\n {"instruction": }]',
     ["not valid JSON", "line 2, column"]),
    ("trailing.json", json.dumps([ALPACA]) + "\n]", ["not valid JSON", "line 2, column 1: Extra data"]),
    ("obj.json", json.dumps(ALPACA), ["expected a JSON list of records", "got an object"]),
    ("empty.json", "  \n", ["empty"]),
    ("emptylist.json", "[]", ["the list is empty"]),
    ("latin1.json", '[{"instruction": "caf\xe9", "output": "b"}]'.encode("latin-1"),
     ["not UTF-8", "byte 0xe9", "line 1"]),
    ("notobj.json", json.dumps([ALPACA, ALPACA, 3]), ["record 2", "expected a JSON object, got a number"]),
    ("missing.json", json.dumps([ALPACA, {"instruction": "a", "input": ""}]),
     ["record 1", "field 'output'", "missing"]),
    ("type.json", json.dumps([{"instruction": "a", "input": 3, "output": "b"}]),
     ["record 0", "field 'input'", "expected a string, got a number"]),
    ("null.json", json.dumps([{"instruction": None, "output": "b"}]),
     ["record 0", "field 'instruction'", "got null"]),
    ("emptyout.json", json.dumps([ALPACA, {"instruction": "a", "input": "", "output": " \n"}]),
     ["record 1", "field 'output'", "empty output"]),
    ("emptyinstr.json", json.dumps([{"instruction": "", "output": "b"}]), ["record 0", "field 'instruction'", "empty"]),
    ("unknown.json", json.dumps([{"prompt": "a", "completion": "b"}]), ["record 0", "unrecognised record"]),
    ("bad.jsonl", json.dumps(ALPACA) + "\n\n" + json.dumps(ALPACA) + "\n{oops\n",
     ["line 4 (record 2)", "not valid JSON"]),
    ("badrec.jsonl", json.dumps(ALPACA) + "\n" + json.dumps({"instruction": "a", "output": 5}) + "\n",
     ["line 2 (record 1)", "field 'output'", "got a number"]),
    ("role.json", json.dumps([{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}]),
     ["record 0", "field 'conversations[1].from'", "unknown role 'bot'"]),
    ("order.json", json.dumps([{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}]),
     ["record 0", "field 'messages[1].role'", "expected the role 'assistant'"]),
    ("first.json", json.dumps([{"messages": [{"role": "assistant", "content": "a"}]}]),
     ["field 'messages[0].role'", "expected the role 'user'"]),
    ("noanswer.json", json.dumps([{"messages": [{"role": "user", "content": "a"}]}]),
     ["field 'messages'", "must end with an assistant turn"]),
    ("tool.json", json.dumps([{"messages": [{"role": "tool", "content": "a"}]}]),
     ["field 'messages[0].role'", "unknown role 'tool'"]),
    ("late_system.json", json.dumps([{"messages": [{"role": "user", "content": "a"},
                                                   {"role": "system", "content": "s"}]}]),
     ["field 'messages[1].role'", "system message may only come first"]),
    ("content.json", json.dumps([{"messages": [{"role": "user", "content": ["a"]}]}]),
     ["field 'messages[0].content'", "expected a string, got a list"]),
    ("emptyturns.json", json.dumps([{"conversations": []}]), ["field 'conversations'", "non-empty list"]),
    ("emptyreply.json",
     json.dumps([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]}]),
     ["field 'conversations[1].value'", "empty output"]),
]


@pytest.mark.parametrize("name,content,expected", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_malformed_input_names_file_record_and_field(tmp_path, capsys, name, content, expected):
    path = write(tmp_path, name, content)
    with pytest.raises(MinisftError) as e:
        load_records(path)
    message = str(e.value)
    assert message.startswith(str(path) + ":")
    for part in expected:
        assert part in message
    # the same through the CLI: exit status 2, the message, no traceback
    from minisft.cli import main
    assert main(["data", "stats", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"minisft: error: {message}" and "Traceback" not in err


def test_real_file_with_a_null_instruction(data_dir):
    with pytest.raises(MinisftError, match=r"instruction-data-llama3-7b\.json: record 2: field 'instruction': "
                                           r"expected a string, got null"):
        load_records(data_dir / "instruction-data-llama3-7b.json")


def test_missing_file():
    with pytest.raises(MinisftError, match="no such file"):
        load_records("/nonexistent/data.json")
