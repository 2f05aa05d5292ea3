"""Dataset curation (`minisft data clean`): rule-based filters, decontamination against evaluation
data, exact and near-duplicate removal, and a report of every record dropped and why.

The steps run in this order, each only on the records the earlier steps kept, so every dropped
record has exactly one reason (the first step that drops it):

    empty            an empty or whitespace-only instruction, user turn, output or assistant turn
    control-chars    C0/C1 control characters other than tab, newline and carriage return, lone
                     surrogates, or U+FFFD (what a decoding error leaves behind)
    non-text         fewer than --min-alpha of the record's non-space characters are letters
    boilerplate      a response containing a refusal or boilerplate phrase ("As an AI language model")
    response-length  a response shorter or longer than --min/--max-response-tokens (GPT-2 tokens,
                     each turn alone)
    too-long         the training text (--prompt-style rendered, GPT-2 tokens) longer than
                     --max-length: dropped, or with --too-long truncate its last response cut to fit
    contaminated     shares an n-gram of --ngram words (13, as GPT-3's decontamination) with a
                     record of the evaluation data (--against, --against-own-split); a record of
                     fewer words contributes its whole text as one gram
    exact-duplicate  the same text as an earlier kept record after normalisation
    near-duplicate   word-shingle (--shingle words) Jaccard similarity >= --threshold with an
                     earlier kept record

Filters and decontamination come before deduplication so that a record a filter would drop is
never the one kept for its duplicates. Normalisation (for duplicates, shingles and n-grams): case
folded, punctuation and symbols dropped, whitespace collapsed: the words are the runs of \\w.

Near duplicates: MinHash signatures (--num-perm) over the set of word shingles, LSH banding to find
candidate pairs, then the exact Jaccard similarity of every candidate pair, so no pair under the
threshold is ever reported. Records are visited in file order and each is compared only with the earlier records
that were kept: the first record of every cluster is kept, and a dropped record names the kept
record it is most similar to. Output is a function of the input, the settings and --seed.
"""
import hashlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields

import numpy as np
from tqdm import tqdm

from . import tokenizer
from .data import TURN_KEYS, normalize_record, read_source, record_format, split_dataset, write_records
from .errors import MinisftError
from .files import output_file, write_json
from .prompts import PromptStyle, get_style

TOO_LONG = ("drop", "truncate")
DEFAULT_PHRASES = (
    "as an ai language model", "as a language model", "as a large language model", "as an ai assistant",
    "i'm just an ai", "i am just an ai", "i'm sorry, but i cannot", "i'm sorry, but i can't",
    "i am sorry, but i cannot", "i cannot fulfill", "i can't fulfill", "i cannot assist with",
    "i can't assist with",
)
# What the control-chars rule refuses: C0 and C1 controls but \t \n \r, lone surrogates, U+FFFD.
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufffd]")
WORD = re.compile(r"\w+")
HIST_BINS = 10
BLOCK = 1024  # records per tiktoken batch or n-gram check: bounds the working memory
SIGNATURE_CHUNK = 8192  # records per block of MinHash signatures: bounds their memory
# Candidates are checked exactly, so the banding is chosen for recall: the most rows per band
# (fewest needless candidates) that still makes a pair at the threshold a candidate this often.
LSH_RECALL = 0.995


@dataclass
class CleanSettings:
    skip: frozenset = frozenset()          # steps not run (names from STEPS)
    prompt_style: str = "alpaca"           # how the training text is rendered (too-long, histograms)
    max_length: int = 1024                 # tokens of training text (the context length)
    too_long: str = "drop"                 # drop | truncate (the last response is cut to fit)
    min_response_tokens: int = 1
    max_response_tokens: int | None = None
    min_alpha: float = 0.25                # the non-text rule's least fraction of letters
    phrases: tuple = DEFAULT_PHRASES       # boilerplate phrases (matched case- and space-insensitively)
    threshold: float = 0.8                 # near duplicates: Jaccard similarity of word shingles
    shingle: int = 2                       # words per shingle
    num_perm: int = 128                    # MinHash permutations
    ngram: int = 13                        # decontamination n-gram, in words
    against: tuple = ()                    # evaluation files (any supported format)
    against_own_split: bool = False        # train part against its own test and val parts
    seed: int = 0                          # the MinHash permutations

    def check(self) -> None:
        for name in self.skip:
            if name not in STEPS:
                raise MinisftError(f"unknown step {name!r} to skip; the steps are {', '.join(STEPS)}")
        if self.too_long not in TOO_LONG:
            raise MinisftError(f"--too-long must be one of {', '.join(TOO_LONG)}, got {self.too_long!r}")
        get_style(self.prompt_style)
        for name in ("max_length", "min_response_tokens", "shingle", "num_perm", "ngram"):
            if getattr(self, name) < 1:
                raise MinisftError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_response_tokens is not None and self.max_response_tokens < self.min_response_tokens:
            raise MinisftError(f"--max-response-tokens {self.max_response_tokens} is below --min-response-tokens "
                               f"{self.min_response_tokens}")
        if not 0 < self.threshold <= 1:
            raise MinisftError(f"--threshold must be in (0, 1], got {self.threshold}")
        if not 0 <= self.min_alpha <= 1:
            raise MinisftError(f"--min-alpha must be in [0, 1], got {self.min_alpha}")
        if not any(p.strip() for p in self.phrases) and "boilerplate" not in self.skip:
            raise MinisftError("the boilerplate phrase list is empty: give phrases or skip the step")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**d, "skip": sorted(self.skip), "phrases": list(self.phrases), "against": list(map(str, self.against))}


def read_phrases(path) -> tuple:
    """Boilerplate phrases from a text file, one per line (blank lines ignored)."""
    try:
        text = open(path, encoding="utf-8").read()
    except (OSError, UnicodeDecodeError) as e:
        raise MinisftError(f"{path}: cannot read the phrase file ({e})") from e
    phrases = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not phrases:
        raise MinisftError(f"{path}: the phrase file has no phrases")
    return phrases


# ---- text normalisation and hashing ----------------------------------------------------------------

def words(text) -> list:
    """The normalised words of a text: case folded, punctuation and whitespace gone."""
    return WORD.findall(text.casefold())


def _squash(text) -> str:
    """Case folded, curly apostrophes straightened, whitespace collapsed: for phrase matching."""
    return " ".join(text.casefold().replace("\u2019", "'").split())


def _mix64(x):
    """splitmix64's finaliser: a bijection of uint64 that spreads every input bit over the output."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class WordHasher:
    """Stable 64-bit hashes of words (blake2b, so they do not change between runs as str hashes
    do), cached per distinct word."""

    def __init__(self):
        self.cache = {}

    def __call__(self, ws) -> np.ndarray:
        c = self.cache
        out = np.empty(len(ws), dtype=np.uint64)  # (m,)
        for i, w in enumerate(ws):
            h = c.get(w)
            if h is None:
                h = c[w] = int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
            out[i] = h
        return out


def gram_hashes(word_hashes, n) -> np.ndarray:
    """(m,) word hashes -> (max(m - n + 1, 1),) hashes of every run of n words (a text of fewer
    words is one gram of all its words; no words, no grams)."""
    m = len(word_hashes)
    if m == 0:
        return word_hashes
    n = min(n, m)
    h = word_hashes[:m - n + 1].copy()  # (m-n+1,)
    for j in range(1, n):
        h = _mix64(h ^ word_hashes[j:m - n + 1 + j])
    return _mix64(h ^ np.uint64(n))     # the gram's length too: a 3-word gram never equals a 13-word one


# ---- MinHash and LSH ----------------------------------------------------------------------------------

def lsh_bands(num_perm, threshold) -> tuple:
    """(bands, rows): the most rows per band with bands = num_perm // rows such that a pair at
    the threshold becomes a candidate (shares a band) with probability >= LSH_RECALL."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold ** rows) ** bands >= LSH_RECALL:
            return bands, rows
    return num_perm, 1


def minhash_signatures(shingle_sets, num_perm, seed) -> np.ndarray:
    """(n, num_perm) uint64 MinHash signatures of n non-empty sets of uint64 hashes: for each of
    num_perm seeded permutations of uint64 (mix64 of x xor a key), the least permuted value."""
    keys = np.random.default_rng(seed).integers(0, 2 ** 63, size=num_perm, dtype=np.int64).astype(np.uint64)
    lengths = np.array([len(s) for s in shingle_sets])  # (n,)
    flat = np.concatenate(shingle_sets)                # (S,)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # (n,)
    sig = np.empty((len(shingle_sets), num_perm), dtype=np.uint64)  # (n, P)
    for p in range(num_perm):
        sig[:, p] = np.minimum.reduceat(_mix64(flat ^ keys[p]), starts)
    return sig


def band_hashes(sig, bands, rows) -> np.ndarray:
    """(n, P) signatures -> (n, bands) one hash per band of `rows` signature values."""
    h = np.zeros((sig.shape[0], bands), dtype=np.uint64)  # (n, b)
    for r in range(rows):
        h = _mix64(h ^ sig[:, r:bands * rows:rows])        # column b*rows + r ... of band b
    return h


def jaccard(a, b) -> float:
    """Jaccard similarity of two sorted unique uint64 arrays."""
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def near_duplicates(shingle_sets, threshold, num_perm, seed, progress=True) -> dict:
    """{i: (j, similarity)} for each set i whose Jaccard similarity with an earlier kept set j is
    >= threshold (j the most similar; ties: the earliest). Sets are sorted unique uint64 arrays,
    visited in order; a set equal to nothing before it is kept. Empty sets are never duplicates."""
    idx = [i for i, s in enumerate(shingle_sets) if len(s)]
    if len(idx) < 2:
        return {}
    bands, rows = lsh_bands(num_perm, threshold)
    sets = [shingle_sets[i] for i in idx]
    bh = np.concatenate([band_hashes(minhash_signatures(sets[c:c + SIGNATURE_CHUNK], num_perm, seed), bands, rows)
                         for c in range(0, len(sets), SIGNATURE_CHUNK)])  # (n, b)
    # Buckets only for band values that more than one record has: the rest can never match.
    groups_of = {}  # position in idx -> ids of its shared buckets
    n_groups = 0
    for b in range(bands):
        order = np.argsort(bh[:, b], kind="stable")      # (n,)
        col = bh[order, b]                               # (n,)
        new = np.concatenate([[True], col[1:] != col[:-1]])
        gid = np.cumsum(new) - 1                         # (n,) bucket id along the sorted column
        sizes = np.bincount(gid)
        shared = sizes[gid] > 1
        for pos, g in zip(order[shared].tolist(), (gid[shared] + n_groups).tolist()):
            groups_of.setdefault(pos, []).append(g)
        n_groups += len(sizes)
    kept_in = {}    # bucket id -> kept positions so far
    dups = {}
    for pos in tqdm(range(len(idx)), desc="near duplicates", unit="rec", disable=None if progress else True,
                    leave=False):
        gs = groups_of.get(pos)
        if gs is None:
            continue
        cands = sorted({c for g in gs for c in kept_in.get(g, ())})
        best = None
        for c in cands:
            sim = jaccard(sets[pos], sets[c])
            if sim >= threshold and (best is None or sim > best[1]):
                best = (c, sim)
        if best is not None:
            dups[idx[pos]] = (idx[best[0]], best[1])
            continue
        for g in gs:
            kept_in.setdefault(g, []).append(pos)
    return dups


# ---- decontamination ---------------------------------------------------------------------------------

class Contamination:
    """The n-grams of evaluation records, and a check of a record against them."""

    def __init__(self, ngram, hasher):
        self.ngram, self.hasher = ngram, hasher
        self.lengths = set()     # gram lengths present (ngram, and the word counts of shorter records)
        self.origin = {}         # gram hash -> where (the evaluation record it came from)

    def add(self, word_hashes, where) -> None:
        grams = gram_hashes(word_hashes, self.ngram)
        if len(grams):
            self.lengths.add(min(self.ngram, len(word_hashes)))
        for g in grams.tolist():
            self.origin.setdefault(g, where)

    def hits(self, texts) -> np.ndarray:
        """(k,) bool: which of k texts (each its (m,) word hashes) share a gram with the evaluation
        data: gram_hashes over all texts at once, keeping the grams that lie inside one text."""
        known = np.fromiter(self.origin, dtype=np.uint64, count=len(self.origin))  # (G,)
        lens = np.array([len(t) for t in texts], dtype=np.int64)                    # (k,)
        flat = np.concatenate(texts).astype(np.uint64) if texts else np.zeros(0, np.uint64)  # (S,)
        ends = np.cumsum(lens)[np.repeat(np.arange(len(texts)), lens)]              # (S,) end of each word's text
        owner = np.repeat(np.arange(len(texts)), lens)                              # (S,)
        hit = np.zeros(len(texts), dtype=bool)                                      # (k,)
        for n in self.lengths:
            count = len(flat) - n + 1
            if count <= 0:
                continue
            g = flat[:count].copy()                                                 # (count,)
            for j in range(1, n):
                g = _mix64(g ^ flat[j:count + j])
            g = _mix64(g ^ np.uint64(n))
            inside = np.arange(count) + n <= ends[:count]
            hit[owner[:count][inside & np.isin(g, known)]] = True
        return hit

    def find(self, word_hashes):
        """(where, first word, words) of the first gram of a text (its (m,) word hashes) found in
        the evaluation data, longest grams first; or None."""
        for n in sorted(self.lengths, reverse=True):
            if n > len(word_hashes):
                continue
            for pos, g in enumerate(gram_hashes(word_hashes, n).tolist()):
                if g in self.origin:
                    return self.origin[g], pos, n
        return None


# ---- records --------------------------------------------------------------------------------------------

def _texts(messages):
    """[(role, text)] of a record's turns, an Alpaca input as a user-side text of its own."""
    out = []
    for m in messages:
        out.append((m["role"], m["content"]))
        if m.get("input"):
            out.append(("input", m["input"]))
    return out


def _with_last_response(rec, text) -> dict:
    """A copy of a raw record whose last assistant turn says `text`."""
    fmt = record_format(rec)
    if fmt == "alpaca":
        return {**rec, "output": text}
    field_name, role_key, text_key = TURN_KEYS[fmt]
    turns = [dict(t) for t in rec[field_name]]
    last = max(j for j, t in enumerate(turns) if t[role_key] in ("assistant", "gpt"))
    turns[last][text_key] = text
    return {**rec, field_name: turns}


def _token_counts(texts, desc) -> np.ndarray:
    """(n,) GPT-2 token counts of texts (special-token strings as plain text, as in training)."""
    enc = tokenizer.gpt2()
    counts = np.empty(len(texts), dtype=np.int64)  # (n,)
    with tqdm(total=len(texts), desc=desc, unit="rec", disable=None, leave=False) as bar:
        for s in range(0, len(texts), BLOCK):
            counts[s:s + BLOCK] = [len(t) for t in enc.encode_ordinary_batch(texts[s:s + BLOCK])]
            bar.update(min(BLOCK, len(texts) - s))
    return counts


def _truncate(messages, style, max_length):
    """The last response cut (at a token boundary, whole characters) so the training text has at
    most max_length tokens, or None if even an empty response is too long."""
    content = messages[-1]["content"]
    toks = tokenizer.encode(content)
    keep = len(toks)
    while keep > 0:
        text = b"".join(tokenizer.token_bytes(t) for t in toks[:keep]).decode("utf-8", errors="ignore").rstrip()
        total = len(tokenizer.encode(style.training_text(messages[:-1] + [{**messages[-1], "content": text}])))
        if total <= max_length and text.strip():
            return text
        keep -= max(total - max_length, 1)
    return None


def _histogram(values, edges) -> list:
    return np.histogram(values, bins=edges)[0].tolist() if len(values) else [0] * (len(edges) - 1)


# ---- the steps ------------------------------------------------------------------------------------------

@dataclass
class Pass:
    """What the steps of one clean share: the records (too-long's truncation rewrites some, in both
    forms) and what the steps have dropped so far."""
    settings: CleanSettings
    style: PromptStyle
    records: list               # each record's normalised messages
    raws: list                  # each record as read: what is written out
    candidates: list            # the indices the steps apply to
    evals: list                 # [(where, messages)] of the evaluation data
    lengths: np.ndarray         # (n,) tokens of each training text, after truncation
    dropped: dict = field(default_factory=dict)  # index -> report entry
    truncated: list = field(default_factory=list)
    hasher: WordHasher = field(default_factory=WordHasher)
    word_hashes: dict = field(default_factory=dict)  # index -> (m,) uint64, for decontamination and shingles

    def live(self) -> list:
        """The candidates no step has dropped yet."""
        return [i for i in self.candidates if i not in self.dropped]

    def hashes_of(self, i) -> np.ndarray:
        if i not in self.word_hashes:
            self.word_hashes[i] = self.hasher(_words_of(self.records[i]))
        return self.word_hashes[i]


def _words_of(messages) -> list:
    return [w for _, t in _texts(messages) for w in words(t)]


# Each step yields (index, *details) for every record it drops; its Step names the details.

def _empty(p: Pass):
    for i in p.live():
        for j, m in enumerate(p.records[i]):
            if m["role"] != "system" and not m["content"].strip():
                yield i, f"turn {j} ({m['role']})"
                break


def _control_chars(p: Pass):
    for i in p.live():
        for role, text in _texts(p.records[i]):
            hit = CONTROL.search(text)
            if hit:
                yield i, role, f"U+{ord(hit.group()):04X}"
                break


def _non_text(p: Pass):
    for i in p.live():
        chars = "".join("".join(t.split()) for _, t in _texts(p.records[i]))
        alpha = sum(c.isalpha() for c in chars) / max(len(chars), 1)
        if alpha < p.settings.min_alpha:
            yield i, round(alpha, 4)


def _boilerplate(p: Pass):
    phrases = [_squash(ph) for ph in p.settings.phrases if ph.strip()]
    for i in p.live():
        for m in p.records[i]:
            text = _squash(m["content"]) if m["role"] == "assistant" else ""
            hit = next((ph for ph in phrases if ph in text), None)
            if hit:
                yield i, hit
                break


def _response_length(p: Pass):
    lo, hi = p.settings.min_response_tokens, p.settings.max_response_tokens
    responses = [(i, m["content"]) for i in p.live() for m in p.records[i] if m["role"] == "assistant"]
    if lo <= 1 and hi is None:  # the defaults: only "" (no tokens) is out of bounds, no need to tokenize
        counts = np.array([len(t) and 1 for _, t in responses], dtype=np.int64)
    else:
        counts = _token_counts([t for _, t in responses], "response tokens")
    out = set()  # a record's first response out of bounds is the one reported
    for (i, _), c in zip(responses, counts.tolist()):
        if i not in out and (c < lo or (hi is not None and c > hi)):
            out.add(i)
            yield i, c


def _too_long(p: Pass):
    s = p.settings
    for i in p.live():
        if p.lengths[i] <= s.max_length:
            continue
        if s.too_long == "truncate" and p.records[i][-1]["role"] == "assistant":
            text = _truncate(p.records[i], p.style, s.max_length)
            if text is not None:
                before = int(p.lengths[i])
                p.records[i] = p.records[i][:-1] + [{**p.records[i][-1], "content": text}]
                p.raws[i] = _with_last_response(p.raws[i], text)
                p.lengths[i] = len(tokenizer.encode(p.style.training_text(p.records[i])))
                p.truncated.append({"index": i, "tokens_before": before, "tokens_after": int(p.lengths[i])})
                continue
        yield i, int(p.lengths[i])


def _contaminated(p: Pass):
    if not p.evals:
        return
    dc = Contamination(p.settings.ngram, p.hasher)
    for where, msgs in p.evals:
        dc.add(p.hasher(_words_of(msgs)), where)
    ids = p.live()
    for c in tqdm(range(0, len(ids), BLOCK), desc="decontaminating", unit="block", disable=None, leave=False):
        block = ids[c:c + BLOCK]
        for i in np.asarray(block)[dc.hits([p.hashes_of(i) for i in block])].tolist():
            where, pos, k = dc.find(p.hashes_of(i))  # the first shared gram, for the report
            yield i, where, " ".join(_words_of(p.records[i])[pos:pos + k])


def _exact_duplicate(p: Pass):
    first: dict[bytes, int] = {}  # digest -> the first kept record with it
    for i in p.live():
        key = "\x1e".join(role + "\x1f" + " ".join(words(t)) for role, t in _texts(p.records[i]))
        digest = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
        if digest in first:
            yield i, first[digest]
        else:
            first[digest] = i


def _near_duplicate(p: Pass):
    s = p.settings
    ids = p.live()
    sets = [np.unique(gram_hashes(p.hashes_of(i), s.shingle)) for i in
            tqdm(ids, desc="shingling", unit="rec", disable=None, leave=False)]
    for pos, (j, sim) in near_duplicates(sets, s.threshold, s.num_perm, s.seed).items():
        yield ids[pos], ids[j], round(sim, 4)


@dataclass(frozen=True)
class Step:
    name: str                           # the reason a dropped record's report entry gives
    run: Callable[[Pass], Iterator]     # yields (index, *details) of each record it drops
    details: tuple                      # the report entry's fields the details fill, in order


# The order of the module's docstring, which says why it is this one.
PIPELINE = (
    Step("empty", _empty, ("field",)),
    Step("control-chars", _control_chars, ("field", "char")),
    Step("non-text", _non_text, ("letters",)),
    Step("boilerplate", _boilerplate, ("phrase",)),
    Step("response-length", _response_length, ("tokens",)),
    Step("too-long", _too_long, ("tokens",)),
    Step("contaminated", _contaminated, ("matches", "ngram")),
    Step("exact-duplicate", _exact_duplicate, ("duplicate_of",)),
    Step("near-duplicate", _near_duplicate, ("duplicate_of", "similarity")),
)
STEPS = tuple(step.name for step in PIPELINE)


# ---- clean ------------------------------------------------------------------------------------------------

def clean(source, out, settings: CleanSettings, report_path=None, cache_dir=None, sha256=None) -> dict:
    """Clean a data source (a file, a URL or the book's URL, as every command reads data: see
    data.read_source; the evaluation files alike) into `out` (the same file layout and record
    formats; kept records are written unchanged but for truncation) and return the report (also
    written to report_path). Everything is read and validated before anything is written."""
    s = settings
    s.check()
    output_file(out)
    if report_path is not None:
        output_file(report_path, "--report")
    seconds, clock = {}, [time.perf_counter()]

    def lap(name):  # the wall time of each part, for the report
        now = time.perf_counter()
        seconds[name], clock[0] = round(now - clock[0], 3), now

    pairs, jsonl = read_source(source, cache_dir, sha256)
    records = [normalize_record(rec, where, allow_empty=True)["messages"] for where, rec in pairs]
    candidates, evals = _evaluation_data(s, pairs, records, cache_dir)
    style = get_style(s.prompt_style)
    lap("read")
    lengths = _token_counts([style.training_text(m) for m in records], "tokenizing")  # (n,)
    p = Pass(s, style, records, [rec for _, rec in pairs], candidates, evals, lengths.copy())
    lap("tokenize")
    for step in PIPELINE:
        if step.name not in s.skip:
            for i, *details in step.run(p):
                p.dropped[i] = {"index": i, "reason": step.name, **dict(zip(step.details, details))}
        lap(step.name)
    kept = [i for i in range(len(records)) if i not in p.dropped]
    write_records(out, [p.raws[i] for i in kept], jsonl)
    lap("write")
    report = _report(p, str(source), str(out), jsonl, lengths, kept, seconds)
    if report_path is not None:
        write_json(report_path, report)
    return report


def _evaluation_data(s: CleanSettings, pairs, records, cache_dir) -> tuple:
    """(the indices the steps apply to, [(where, messages)] of the evaluation data): the --against
    files, and with --against-own-split the file's own test and val parts, which the steps leave be."""
    evals = []
    for f in s.against:
        epairs, _ = read_source(f, cache_dir)
        evals += [(where, normalize_record(rec, where, allow_empty=True)["messages"]) for where, rec in epairs]
    if not s.against_own_split:
        return list(range(len(records))), evals
    part = split_dataset(range(len(records)))
    evals += [(pairs[i][0] + f" ({name} part)", records[i]) for name in ("test", "val") for i in getattr(part, name)]
    return part.train, evals


def _report(p: Pass, source, out, jsonl, before, kept, seconds) -> dict:
    """The report of a clean whose steps have run (before: (n,) training-text tokens before truncation)."""
    s, n = p.settings, len(p.records)
    # HIST_BINS equal bins up to the context length, and one for everything longer (if any is)
    top = min(int(before.max()), s.max_length) + 1
    edges = np.unique(np.linspace(before.min(), top, HIST_BINS + 1).astype(np.int64))
    if before.max() >= top:
        edges = np.append(edges, before.max() + 1)
    report = {
        "input": source, "output": out, "layout": "jsonl" if jsonl else "json",
        "formats": {f: sum(record_format(r) == f for r in p.raws) for f in ("alpaca", "sharegpt", "openai")},
        "settings": s.to_dict(), "steps": [step for step in STEPS if step not in s.skip],
        "records": n, "checked": len(p.candidates), "kept": len(kept), "dropped_total": len(p.dropped),
        "dropped_by_step": {step: sum(d["reason"] == step for d in p.dropped.values()) for step in STEPS},
        "truncated_total": len(p.truncated), "evaluation_records": len(p.evals), "seconds": seconds,
        "dropped": [p.dropped[i] for i in sorted(p.dropped)], "truncated": p.truncated,
        "token_lengths": {"style": p.style.name, "bin_edges": edges.tolist(),
                          "before": _histogram(before, edges), "after": _histogram(p.lengths[kept], edges)},
    }
    if s.against_own_split:
        report["split"] = own_split_note(n, len(p.dropped))
    return report


def own_split_note(n, dropped) -> dict:
    """What minisft's 85/10/5 file-order split makes of the cleaned file: the test and val parts
    stay at the end, but the train boundary moves forward by the records dropped from train."""
    before = split_dataset(range(n))
    after = split_dataset(range(n - dropped))
    moved = len(after.train) - (len(before.train) - dropped)
    return {"train": len(before.train) - dropped, "test": len(before.test), "val": len(before.val),
            "resplit_train_takes_from_test": moved}


def summary(report) -> list:
    """The report as readable text lines for the terminal."""
    lines = [f"{report['input']}: {report['records']} records ({report['layout']}; " +
             ", ".join(f"{v} {k}" for k, v in report["formats"].items() if v) + ")"]
    if report["settings"]["against_own_split"] or report["evaluation_records"]:
        lines.append(f"checked {report['checked']} records against {report['evaluation_records']} evaluation records")
    for step in STEPS:
        if step in report["steps"]:
            lines.append(f"  {step:16s} dropped {report['dropped_by_step'][step]}")
        else:
            lines.append(f"  {step:16s} skipped")
    if report["truncated_total"]:
        lines.append(f"  truncated        {report['truncated_total']} (last response cut to fit)")
    lines.append(f"kept {report['kept']} of {report['records']} records -> {report['output']} "
                 f"({sum(report['seconds'].values()):.1f} s)")
    h = report["token_lengths"]
    edges = h["bin_edges"]
    lines.append(f"training-text tokens ({h['style']} style): before | after")
    for k in range(len(edges) - 1):
        lines.append(f"  {edges[k]:6d} - {edges[k + 1] - 1:6d} | {h['before'][k]:7d} | {h['after'][k]:7d}")
    split = report.get("split")
    if split and split["resplit_train_takes_from_test"]:
        k = split["resplit_train_takes_from_test"]
        lines.append(f"note: the file's test and val parts are kept whole at its end, but minisft's 85/10/5 split "
                     f"of the cleaned file would move {k} test record{'s' * (k > 1)} into train: evaluate on the "
                     "original file's test part")
    return lines
