"""Instruction data: load and validate records, split them as the book does, tokenize them into
examples, and batch the examples (the book's padded collate, or padding-free packed batches).

Files: a JSON list of records, or JSON Lines (one record per line; chosen by the .jsonl suffix, or
when a file holds several top-level objects). Three record formats, detected per record:

    Alpaca    {"instruction": str, "input": str (optional), "output": str}   (extra keys ignored)
    ShareGPT  {"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}
    OpenAI    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}

All become one internal form, the OpenAI one: {"messages": [...]} with an optional system message
first, then user and assistant turns alternating, ending with an assistant turn. An Alpaca record
becomes [{"role": "user", "content": instruction, "input": input}, {"role": "assistant", "content":
output}]: the input stays separate because the alpaca style renders it as its own section.

Every record is validated before anything trains: a problem raises MinisftError naming the file,
the record (and line, for JSON Lines) and the field.
"""
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .batch import IGNORE_INDEX, PackedBatch, pack_sequences
from .download import fetch, is_url
from .errors import MinisftError
from .files import output_file
from .prompts import get_style, tokenize_segments
from .tokenizer import EOT, GPT2, Tokenizer

DEFAULT_DATA_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
                    "01_main-chapter-code/instruction-data.json")
# The book's 1,100 records as the book trained on them, bundled with the package (minisft/assets).
DEFAULT_DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
BUNDLED_DATA = files("minisft") / "assets" / "instruction-data.json"

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


# ---- reading files -------------------------------------------------------------------------------

def _json_type(v) -> str:
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def read_records(path) -> list:
    """The raw JSON records of a file as [(where, record)], `where` naming file, record (and line)
    for error messages. Raises MinisftError for an unreadable, non-UTF-8, non-JSON or empty file."""
    return read_records_layout(path)[0]


def read_records_layout(path) -> tuple:
    """read_records(path), and whether the file is JSON Lines (to write one back the same way)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise MinisftError(f"{path}: cannot read the file ({e.strerror or e})") from e
    try:
        text = raw.decode("utf-8-sig")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise MinisftError(f"{path}: not UTF-8 text (invalid byte 0x{raw[e.start]:02x} at byte {e.start}, "
                           f"line {line})") from e
    if not text.strip():
        raise MinisftError(f"{path}: the file is empty: no records")
    if path.suffix.lower() != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data" or not text.lstrip().startswith("{"):  # else: several objects, JSON Lines
                raise MinisftError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
        else:
            if not isinstance(data, list):
                raise MinisftError(f"{path}: expected a JSON list of records (or JSON Lines), got {_json_type(data)}")
            if not data:
                raise MinisftError(f"{path}: the list is empty: no records")
            return [(f"{path}: record {i}", rec) for i, rec in enumerate(data)], False
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {lineno} (record {len(records)})"
        try:
            records.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            raise MinisftError(f"{where}: not valid JSON (column {e.colno}: {e.msg})") from e
    return records, True


# ---- validating records -----------------------------------------------------------------------------

def _field_error(where, field, problem):
    return MinisftError(f"{where}: field '{field}': {problem}")


def _string(obj, key, where, field=None):
    """obj[key] as a string, or a MinisftError naming the field."""
    field = field or key
    if key not in obj:
        raise _field_error(where, field, "missing")
    if not isinstance(obj[key], str):
        raise _field_error(where, field, f"expected a string, got {_json_type(obj[key])}")
    return obj[key]


def _from_alpaca(rec, where, need_output, allow_empty):
    instruction = _string(rec, "instruction", where)
    if not instruction.strip() and not allow_empty:
        raise _field_error(where, "instruction", "empty instruction")
    inp = _string(rec, "input", where) if "input" in rec else ""
    messages = [{"role": "user", "content": instruction, "input": inp}]
    if need_output or "output" in rec:
        output = _string(rec, "output", where)
        if not output.strip() and not allow_empty:
            raise _field_error(where, "output", "empty output")
        messages.append({"role": "assistant", "content": output})
    return {"messages": messages}


def _from_turns(rec, where, field, role_key, text_key, roles, need_output, allow_empty):
    """ShareGPT conversations / OpenAI messages -> internal messages, checking the turn order."""
    turns = rec[field]
    if not isinstance(turns, list) or not turns:
        raise _field_error(where, field, f"expected a non-empty list of turns, got {_json_type(turns)}"
                           + (" (empty)" if turns == [] else ""))
    messages = []
    for j, turn in enumerate(turns):
        f = f"{field}[{j}]"
        if not isinstance(turn, dict):
            raise _field_error(where, f, f"expected an object, got {_json_type(turn)}")
        role = _string(turn, role_key, where, f"{f}.{role_key}")
        if role not in roles:
            raise _field_error(where, f"{f}.{role_key}", f"unknown role {role!r}; expected one of "
                               f"{', '.join(map(repr, roles))}")
        role = roles[role]
        content = _string(turn, text_key, where, f"{f}.{text_key}")
        if role == "system":
            if j != 0:
                raise _field_error(where, f"{f}.{role_key}", "a system message may only come first")
            if content.strip():  # an empty system message is the same as none
                messages.append({"role": "system", "content": content})
            continue
        expected = "user" if not messages or messages[-1]["role"] != "user" else "assistant"
        if role != expected:
            raise _field_error(where, f"{f}.{role_key}", f"expected the role {expected!r} here (turns "
                               f"alternate user, assistant, ... starting with user), got {role!r}")
        if not content.strip() and not allow_empty:
            raise _field_error(where, f"{f}.{text_key}", "empty output" if role == "assistant" else "empty message")
        msg = {"role": role, "content": content}
        if role == "user" and "input" in turn:  # the internal form of an Alpaca record
            msg["input"] = _string(turn, "input", where, f"{f}.input")
        messages.append(msg)
    if not messages or messages[-1]["role"] == "system":
        raise _field_error(where, field, "no user turn")
    if messages[-1]["role"] != "assistant" and need_output:
        raise _field_error(where, field, "the conversation must end with an assistant turn (the output to train on)")
    return {"messages": messages}


def normalize_record(rec, where="record", need_output=True, allow_empty=False) -> dict:
    """Any supported record form -> {"messages": [...]}, validated. need_output=False accepts a
    record without its answer (a prompt for generation); allow_empty=True accepts empty or
    whitespace-only turns (for `data clean`, which drops them and says so)."""
    if not isinstance(rec, dict):
        raise MinisftError(f"{where}: expected a JSON object, got {_json_type(rec)}")
    if "messages" in rec:
        return _from_turns(rec, where, "messages", "role", "content", OPENAI_ROLES, need_output, allow_empty)
    if "conversations" in rec:
        return _from_turns(rec, where, "conversations", "from", "value", SHAREGPT_ROLES, need_output,
                           allow_empty)
    if "instruction" in rec:
        return _from_alpaca(rec, where, need_output, allow_empty)
    raise MinisftError(f"{where}: unrecognised record with keys {sorted(rec)}: expected Alpaca "
                       "(instruction, input, output), ShareGPT (conversations) or OpenAI (messages)")


def source_path(source, cache_dir=None, sha256=None) -> Path:
    """The local file of a data source: for the book's URL the bundled copy (the same bytes that URL
    serves: no download), for another URL its download in the cache, else the path as given."""
    if source == DEFAULT_DATA_URL and sha256 in (None, DEFAULT_DATA_SHA256):
        return Path(str(BUNDLED_DATA))
    return fetch(source, cache_dir, sha256)


def read_source(source, cache_dir=None, sha256=None) -> tuple:
    """read_records_layout of a data source (a file, a URL, the book's URL: see source_path), as
    every command that reads data reads it."""
    path = source_path(source, cache_dir, sha256)
    try:
        return read_records_layout(path)
    except MinisftError as e:
        if not is_url(source):
            raise
        # What the URL served is no data file (an error page, a login form): keeping it would serve
        # the same junk to every later run without asking the server again.
        path.unlink(missing_ok=True)
        raise MinisftError(f"{source}: the download is not a data file, so it was removed from the cache "
                           f"(the next run downloads it again): {e}") from None


def load_records(source=DEFAULT_DATA_URL, cache_dir=None, sha256=None) -> list:
    """Load and validate every record of a file, or of a URL downloaded into the cache."""
    return [normalize_record(rec, where) for where, rec in read_source(source, cache_dir, sha256)[0]]


def load_splits(source=DEFAULT_DATA_URL, cache_dir=None, sha256=None, shuffle_seed=None):
    """The book's split twice over, entry for entry: (raw records as in the file, validated
    records). Results such as model responses are written beside the raw ones."""
    pairs = read_source(source, cache_dir, sha256)[0]
    records = [normalize_record(rec, where) for where, rec in pairs]
    return split_dataset([rec for _, rec in pairs], shuffle_seed), split_dataset(records, shuffle_seed)


def format_input(entry, style="alpaca") -> str:
    """The book's format_input: the prompt of a record (any supported form) without the response
    header. For alpaca: preamble, "### Instruction:", and "### Input:" when the input is non-empty."""
    return get_style(style).format_input(normalize_record(entry, need_output=False)["messages"])


# ---- writing and converting files ---------------------------------------------------------------

FORMATS = ("alpaca", "sharegpt", "openai")
LAYOUTS = ("json", "jsonl")  # a JSON list of records, JSON Lines
# Each format's record keys: (the list of turns, its role key, its text key); Alpaca has no turns.
TURN_KEYS = {"sharegpt": ("conversations", "from", "value"), "openai": ("messages", "role", "content")}
ALPACA_KEYS = ("instruction", "input", "output")
SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


def record_format(rec) -> str:
    """The format of a raw record (one normalize_record accepts): alpaca, sharegpt or openai."""
    return "openai" if "messages" in rec else "sharegpt" if "conversations" in rec else "alpaca"


def write_records(path, records, jsonl) -> None:
    """Raw records to a file, atomically: JSON Lines one compact record per line, or a JSON list
    as the book writes its files (json.dump with indent=4, no final newline), so the book's
    instruction-data.json reads and writes back byte for byte."""
    from .files import write_text

    if jsonl:
        write_text(path, "".join(json.dumps(rec) + "\n" for rec in records))
    else:
        write_text(path, json.dumps(records, indent=4))


def _turns(rec):
    """A raw record's turns as [(role, {key: value} in the internal form)] and its other keys."""
    fmt = record_format(rec)
    if fmt == "alpaca":
        user = {"content": rec["instruction"]}
        if "input" in rec:
            user["input"] = rec["input"]
        turns = [("user", user)] + ([("assistant", {"content": rec["output"]})] if "output" in rec else [])
        return turns, {k: v for k, v in rec.items() if k not in ALPACA_KEYS}
    field, role_key, text_key = TURN_KEYS[fmt]
    roles = OPENAI_ROLES if fmt == "openai" else SHAREGPT_ROLES
    turns = [(roles[t[role_key]], {"content" if k == text_key else k: v for k, v in t.items() if k != role_key})
             for t in rec[field]]
    return turns, {k: v for k, v in rec.items() if k != field}


def convert_record(rec, to, where="record") -> dict:
    """A raw record (validated here) in another format, losing nothing: keys the formats do not
    name (an id, a per-turn weight) are carried along, an Alpaca input travels as the user turn's
    "input" key (which minisft reads back), and key order is the format's keys, then the rest.
    A record the target cannot express (a system message or several turns in Alpaca) raises
    MinisftError naming it."""
    normalize_record(rec, where, allow_empty=True)
    if record_format(rec) == to:
        return rec
    turns, extra = _turns(rec)
    if to == "alpaca":
        roles = [role for role, _ in turns]
        if roles != ["user", "assistant"]:
            problem = ("a system message" if "system" in roles else
                       f"{roles.count('assistant')} assistant turns" if len(roles) > 2 else "no output")
            raise MinisftError(f"{where}: cannot be written as Alpaca (one instruction, an optional input, one "
                               f"output): the record has {problem}")
        (_, user), (_, answer) = turns
        for j, msg in enumerate((user, answer)):
            unknown = sorted(set(msg) - {"content", "input"})
            if unknown:
                raise MinisftError(f"{where}: turn {j} has the key {unknown[0]!r}, which Alpaca has no place for")
        out = {"instruction": user["content"]}
        if "input" in user:
            out["input"] = user["input"]
        out["output"] = answer["content"]
        return {**out, **extra}
    field, role_key, text_key = TURN_KEYS[to]
    names = SHAREGPT_FROM if to == "sharegpt" else OPENAI_ROLES
    out = [{role_key: names[role], **{text_key if k == "content" else k: v for k, v in msg.items()}}
           for role, msg in turns]
    return {field: out, **extra}


def output_layout(path, layout=None) -> bool:
    """Whether to write `path` as JSON Lines: as `layout` says ("json" or "jsonl"), else as the
    file's extension says (.jsonl: one record per line, .json: a JSON list)."""
    if layout is None:
        layout = {".json": "json", ".jsonl": "jsonl"}.get(Path(path).suffix.lower())
        if layout is None:
            raise MinisftError(f"--out {path}: the extension names no layout: end the name in .json (a JSON "
                               "list) or .jsonl (one record per line), or pass --layout json|jsonl")
    if layout not in LAYOUTS:
        raise MinisftError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout == "jsonl"


def convert_file(source, to, out, layout=None, cache_dir=None, sha256=None) -> int:
    """Convert every record of a data source (see read_source) to `to`, written in `layout` (see
    output_layout); all are converted before anything is written. Returns the number of records."""
    if to not in FORMATS:
        raise MinisftError(f"unknown format {to!r}; choose one of {', '.join(FORMATS)}")
    jsonl = output_layout(out, layout)
    output_file(out)
    pairs, _ = read_source(source, cache_dir, sha256)
    records = [convert_record(rec, to, where) for where, rec in tqdm(pairs, desc="converting", unit="rec",
                                                                      disable=None, leave=False)]
    write_records(out, records, jsonl)
    return len(records)


# ---- the book's split --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    train: list
    val: list
    test: list


def split_dataset(data, shuffle_seed=None, train_frac=0.85, test_frac=0.10) -> Split:
    """The book's split, in file order: the first 85% train, the next 10% test, the rest val
    (935/110/55 of the book's 1100). With shuffle_seed, the records are shuffled first."""
    data = list(data)
    if shuffle_seed is not None:
        data = [data[i] for i in np.random.default_rng(shuffle_seed).permutation(len(data))]
    n_train = int(len(data) * train_frac)
    n_test = int(len(data) * test_frac)
    return Split(train=data[:n_train], test=data[n_train:n_train + n_test], val=data[n_train + n_test:])


# ---- examples --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    tokens: np.ndarray   # (L,) int64: the tokenized training text
    trained: np.ndarray  # (L,) bool: is the target predicting token i trained on (trained[0] unused)


def encode_record(record, style="alpaca", mask="none", tok: Tokenizer = GPT2) -> Example:
    return Example(*tokenize_segments(get_style(style).segments(record["messages"]), mask, tok))


def long_records(examples, records, style, max_len, tok: Tokenizer = GPT2) -> tuple[list, list]:
    """Which examples max_len cuts (more tokens than the targets it keeps), and which of those lose
    their whole response: no response token among the first max_len targets. (indices, indices)"""
    cut = [i for i, e in enumerate(examples) if len(e.tokens) > max_len]
    # target j predicts token j + 1: the kept targets predict tokens 1..max_len
    lost = [i for i in cut if not encode_record(records[i], style, "header", tok).trained[1:max_len + 1].any()]
    return cut, lost


def encode_records(records, style="alpaca", mask="none", tok: Tokenizer = GPT2) -> list:
    """Tokenize validated records (with a progress bar on a terminal)."""
    style = get_style(style)
    examples = []
    for i, r in enumerate(tqdm(records, desc="tokenizing", unit="rec", disable=None, leave=False)):
        try:
            examples.append(encode_record(r, style, mask, tok))
        except MinisftError as e:  # a chat template refusing a record's text: say which record
            raise MinisftError(f"record {i}: {e}") from None
    return examples


# ---- batches ----------------------------------------------------------------------------------------

def _book_row(item, length, pad_token_id, ignore_index, trained):
    """One row of the book's collate: the item, one end-of-text, padding to length+1; inputs are
    all but the last, targets all but the first; every pad target but the first is ignored (so
    the model learns to emit one end-of-text). Like the book, it looks for pad_token_id among the
    targets, so a pad id inside the item itself would count as the first pad."""
    padded = np.full(length + 1, pad_token_id, dtype=np.int64)  # (T+1,)
    padded[:len(item)] = item
    inputs, targets = padded[:-1], padded[1:].copy()            # (T,), (T,)
    pads = np.flatnonzero(targets == pad_token_id)
    targets[pads[1:]] = ignore_index
    if trained is not None:  # prompt masking: targets[j] predicts item[j + 1]
        trained = np.asarray(trained, dtype=bool)
        if trained.shape != (len(item),):
            raise ValueError(f"trained mask of shape {trained.shape} for an item of {len(item)} tokens")
        targets[:max(len(item) - 1, 0)][~trained[1:]] = ignore_index
    return inputs, targets


def collate_padded(batch, pad_token_id=EOT, ignore_index=IGNORE_INDEX, allowed_max_length=None, trained=None):
    """The book's custom_collate_fn: a list of token sequences -> (inputs, targets), numpy int64
    (B, T) with T = the longest item (+1 end-of-text, -1 shift), truncated to allowed_max_length.

    trained: optional per-item bool arrays (Example.trained); targets predicting untrained tokens
    become ignore_index (with mask="input" this is the book's exercise 7.2 collate).
    """
    if not len(batch):
        raise ValueError("collate_padded: empty batch")
    length = max(len(item) for item in batch)
    rows = [_book_row(item, length, pad_token_id, ignore_index, None if trained is None else trained[i])
            for i, item in enumerate(batch)]
    inputs = np.stack([x for x, _ in rows])   # (B, T)
    targets = np.stack([y for _, y in rows])  # (B, T)
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs, targets


def collate_packed(batch, pad_token_id=EOT, allowed_max_length=None, trained=None) -> PackedBatch:
    """The padding-free form of collate_padded: each row keeps exactly the book's (input, target)
    pairs up to its last trained target, and no padding; rows with nothing to train are dropped.
    Equal to pack_padded(*collate_padded(...)), so the loss and gradients are the same."""
    rows_in, rows_tg = [], []
    for i, item in enumerate(batch):
        x, y = _book_row(item, len(item), pad_token_id, IGNORE_INDEX, None if trained is None else trained[i])
        x, y = x[:allowed_max_length], y[:allowed_max_length]  # (T_i,)
        valid = np.flatnonzero(y != IGNORE_INDEX)
        if valid.size:
            rows_in.append(x[:valid[-1] + 1])
            rows_tg.append(y[:valid[-1] + 1])
    return pack_sequences(rows_in, rows_tg)


def collate_examples(examples, packed=True, allowed_max_length=None, eos=EOT):
    """Examples -> a PackedBatch (packed=True) or the book's padded (inputs, targets); eos: the
    tokenizer's end-of-text, appended to every example (and the padding)."""
    tokens, trained = [e.tokens for e in examples], [e.trained for e in examples]
    if packed:
        return collate_packed(tokens, eos, allowed_max_length=allowed_max_length, trained=trained)
    return collate_padded(tokens, eos, allowed_max_length=allowed_max_length, trained=trained)


class Loader:
    """Batches over a dataset with the book's DataLoader rules (train: shuffle=True,
    drop_last=True; val/test: neither), deterministic for a seed.

    Epoch e's order is a permutation drawn from numpy's Generator seeded with (seed, e), so it
    depends on nothing but those two numbers (and the numpy version: numpy does not promise the
    same stream across releases). It is not torch's order. The position (epoch, batches
    handed out in that epoch) is a small JSON-able state_dict; a loader restored from it yields
    exactly the batches the saved one had not yet handed out.

    Iterating yields the rest of the current epoch, then moves to the next epoch.
    """

    def __init__(self, examples, batch_size, shuffle, drop_last, seed=0, collate=collate_examples):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise MinisftError(f"batch size must be a positive integer, got {batch_size!r}")
        self.examples, self.batch_size, self.shuffle, self.drop_last = examples, batch_size, shuffle, drop_last
        self.seed, self.collate = int(seed), collate
        self.epoch, self.batch = 0, 0

    def __len__(self) -> int:
        n, b = len(self.examples), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def batch_indices(self, epoch) -> list:
        """The example indices of every batch of an epoch."""
        n = len(self.examples)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(len(self))]

    def __iter__(self):
        batches = self.batch_indices(self.epoch)
        while self.batch < len(batches):
            idx = batches[self.batch]
            self.batch += 1  # counted as handed out before the caller sees it
            yield self.collate([self.examples[i] for i in idx])
        self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "num_examples": len(self.examples),
                "batch_size": self.batch_size, "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("num_examples", "batch_size", "shuffle", "drop_last"):
            if state.get(key) != mine[key]:
                raise MinisftError(f"cannot resume the data loader: it was saved with {key}={state.get(key)!r}, "
                                   f"this run has {key}={mine[key]!r}")
        self.seed, self.epoch, self.batch = int(state["seed"]), int(state["epoch"]), int(state["batch"])
