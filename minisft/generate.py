"""Text generation: incremental decoding with a KV cache, the book's cache-less loop as its reference,
sampling, and the helpers the `generate` and `chat` commands are built from.

Cached decoding runs each prompt once (a packed prefill of every prompt at once), then one position
per sequence per step, each layer's keys and values kept in the model's KV cache (`GPT.prefill`,
`GPT.decode`). A sequence that ends (end-of-text, or max_new_tokens) leaves the cache and costs
nothing more.

The context length C: the book's loop feeds the last C tokens of a sequence at every step, so once a
sequence outgrows C its window slides and every position changes each step; no cached key stays
valid. Such a sequence leaves the cache and from then on is recomputed from its last C tokens each
step, exactly as the book does, so cached and uncached generation agree token for token at any length.

Sampling happens on the host in float64 numpy from one seeded Generator, the same on every backend:
temperature 0 is greedy (argmax); otherwise logits / temperature, then top-k, then top-p (nucleus),
then one draw per sequence in prompt order.
"""
import sys

import numpy as np

from .batch import pack_sequences
from .progress import progress as progress_bar
from .tokenizer import EOT, TextPieces


# ---- sampling ----------------------------------------------------------------------------------------
def sample_next(logits, rng, temperature=0.0, top_k=None, top_p=None) -> np.ndarray:
    """logits (S, V) -> next token ids (S,).

    temperature 0 picks the argmax (the first on a tie, as torch.argmax). Otherwise the logits are
    divided by the temperature; top_k keeps exactly the k largest; top_p keeps the smallest set of
    most probable tokens whose probability reaches top_p (the token that crosses it included, so the
    most probable token always stays); one uniform draw per row then picks from what is left."""
    logits = np.asarray(logits, dtype=np.float64)                    # (S, V)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and not 1 <= top_k <= logits.shape[-1]:
        raise ValueError(f"top_k must lie in [1, {logits.shape[-1]}], got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if temperature == 0.0:
        return logits.argmax(axis=-1)
    logits = logits / temperature
    rows = np.arange(len(logits))[:, None]                           # (S, 1)
    if top_k is not None:
        top = np.argpartition(-logits, top_k - 1, axis=-1)[:, :top_k]  # (S, k) the k largest, any order
        kept = np.full_like(logits, -np.inf)
        kept[rows, top] = logits[rows, top]
        logits = kept
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)                       # (S, V)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")           # (S, V) most probable first
        sorted_p = probs[rows, order]
        before = np.cumsum(sorted_p, axis=-1) - sorted_p             # (S, V) mass of the tokens ahead
        probs[rows, order] = np.where(before < top_p, sorted_p, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    # Inverse CDF: the first token whose cumulative probability reaches the draw. (1 - u) lies in
    # (0, 1], so a token of probability 0 (cumulative sum not rising) can never be the first.
    cdf = np.cumsum(probs, axis=-1)                                  # (S, V)
    u = 1.0 - rng.random(len(probs))                                 # (S,)
    idx = (cdf < u[:, None] * cdf[:, -1:]).sum(axis=-1)
    return np.minimum(idx, probs.shape[-1] - 1)


def _check_prompts(prompts, max_new_tokens):
    if not prompts:
        raise ValueError("generate: no prompts")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"generate: prompt {i} is empty (it needs at least one token)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def _advance(active, next_tokens, seqs, new, max_new_tokens, eos_id, on_token) -> list:
    """Append each active sequence's sampled token (an end-of-text ends it, unappended, as in the
    book; eos_id: an id, or a tuple of them, e.g. a chat model's end-of-turn and end-of-text).
    -> the sequences that go on."""
    stops = () if eos_id is None else (eos_id,) if isinstance(eos_id, int) else tuple(eos_id)
    going = []
    for i, t in zip(active, next_tokens.tolist()):
        if t in stops:
            continue
        seqs[i].append(t)
        new[i].append(t)
        if on_token is not None:
            on_token(i, t)
        if len(new[i]) < max_new_tokens:
            going.append(i)
    return going


# ---- the two generation loops ------------------------------------------------------------------------
def generate_uncached(model, prompts, max_new_tokens, *, temperature=0.0, top_k=None, top_p=None,
                      eos_id=EOT, rng=0, on_token=None) -> list:
    """The book's loop, the reference: each step recomputes every active sequence's whole window
    (its last C tokens) and takes the logits of its last position.

    prompts: lists of token ids. rng: a numpy Generator or a seed. on_token(i, token) is called for
    every token appended to prompt i. -> the new tokens of each prompt (without the end-of-text)."""
    _check_prompts(prompts, max_new_tokens)
    rng, C = np.random.default_rng(rng), model.cfg.context_length
    seqs, new = [list(p) for p in prompts], [[] for _ in prompts]
    active = list(range(len(prompts))) if max_new_tokens > 0 else []
    while active:
        logits = model.logits_last(pack_sequences([seqs[i][-C:] for i in active]))  # (S', V)
        nxt = sample_next(logits, rng, temperature, top_k, top_p)
        active = _advance(active, nxt, seqs, new, max_new_tokens, eos_id, on_token)
    return new


def generate(model, prompts, max_new_tokens, *, temperature=0.0, top_k=None, top_p=None,
             eos_id=EOT, rng=0, on_token=None) -> list:
    """Generate with the KV cache; the same arguments and, token for token, the same result as
    generate_uncached (up to float rounding between the two computation orders)."""
    _check_prompts(prompts, max_new_tokens)
    rng, C = np.random.default_rng(rng), model.cfg.context_length
    seqs, new = [list(p) for p in prompts], [[] for _ in prompts]
    if max_new_tokens == 0:
        return new
    # Room for the longest sequence that still fits the context (the last sampled token is never fed).
    max_len = min(C, max(len(p) for p in prompts) + max_new_tokens - 1)
    cache = model.kv_cache(len(prompts), max_len)
    logits = model.prefill(cache, pack_sequences([p[-C:] for p in seqs]))             # (S, V)
    active = list(range(len(prompts)))
    cached = list(active)   # the prompt behind each cache row, in cache-row order
    while True:
        nxt = sample_next(logits, rng, temperature, top_k, top_p)   # (S',) in `active` order
        active = _advance(active, nxt, seqs, new, max_new_tokens, eos_id, on_token)
        if not active:
            return new
        fits = [i for i in active if len(seqs[i]) <= C]               # the new token's position < C
        if fits != cached:  # rows that stopped or outgrew the context leave the cache
            model.kv_cache_keep(cache, [cached.index(i) for i in fits])
            cached = fits
        rows = {}
        if fits:
            for i, row in zip(fits, model.decode(cache, [seqs[i][-1] for i in fits])):
                rows[i] = row
        slid = [i for i in active if len(seqs[i]) > C]
        if slid:
            windows = pack_sequences([seqs[i][-C:] for i in slid])
            for i, row in zip(slid, model.logits_last(windows)):
                rows[i] = row
        logits = np.stack([rows[i] for i in active])                  # (S', V) in `active` order


# ---- text in, text out --------------------------------------------------------------------------------
def extract_book_response(generated_text: str, input_text: str) -> str:
    """The book's response extraction (`--book-prompt`): the prompt ends without the response header,
    so the model writes it; drop the prompt, remove every "### Response:", strip."""
    return generated_text[len(input_text):].replace("### Response:", "").strip()


def generate_responses(model, prompts, encode, decode, max_new_tokens=256, *, batch_size=8,
                       book_prompt=False, eos_id=EOT, rng=0, progress=True, **sampling) -> list:
    """Text prompts -> response texts, batch_size prompts decoded together.

    encode(str) -> token ids, decode(ids) -> str. By default a prompt ends with the response header
    and the response is the generated text stripped; book_prompt=True reproduces the book (see
    extract_book_response). sampling: temperature, top_k, top_p."""
    rng = np.random.default_rng(rng)
    responses = []
    with progress_bar(len(prompts), "generating", "prompt", enabled=progress) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            ids = [encode(p) for p in chunk]
            outs = generate(model, ids, max_new_tokens, eos_id=eos_id, rng=rng, **sampling)
            for p, pid, out in zip(chunk, ids, outs):
                if book_prompt:
                    responses.append(extract_book_response(decode(pid + out), p))
                else:
                    responses.append(decode(out).strip())
            bar.update(len(chunk))
    return responses


class _TextStream:
    """Writes decoded text as tokens arrive, never part of a character (tokenizer.TextPieces)."""

    def __init__(self, decode, output):
        self.pieces, self.output = TextPieces(decode), output

    def add(self, token) -> None:
        self._write(self.pieces.release(self.pieces.add(token)))

    def finish(self) -> str:
        self._write(self.pieces.release(len(self.pieces.text)) + "\n")
        return self.pieces.text

    def _write(self, text) -> None:
        self.output.write(text)
        self.output.flush()


CHAT_COMMANDS = {"/help": "list these commands", "/reset": "forget the conversation and start a new one",
                 "/quit": "end the chat (so does end of input)"}


def fit_conversation(style, messages, encode, budget) -> tuple:
    """A conversation (user and assistant turns, ending with the user's) rendered as the prompt in
    the style's multi-turn form (style.prompt, as `serve` renders /v1/chat/completions), its oldest
    exchanges dropped until the prompt has at most `budget` tokens; the last message always stays.
    -> (the messages kept, the prompt's token ids, how many exchanges were dropped)."""
    dropped = 0
    while True:
        ids = encode(style.prompt(messages))
        if len(ids) <= budget or len(messages) == 1:
            return messages, ids, dropped
        messages, dropped = messages[2:], dropped + 1  # a user turn and the assistant's answer to it


def chat_loop(model, style, encode, decode, input_fn=input, output=sys.stdout,
              max_new_tokens=256, eos_id=EOT, rng=0, **sampling) -> None:
    """Interactive and multi-turn: read a message, render the conversation so far in the prompt
    style (fit_conversation), stream the reply token by token. The commands of CHAT_COMMANDS are
    never sent to the model; empty lines are skipped."""
    rng = np.random.default_rng(rng)
    context = model.cfg.context_length
    # Room for the reply: all of max_new_tokens, but at most half the context, so that a long
    # --max-new-tokens still leaves the conversation room.
    budget = context - min(max_new_tokens, context // 2)
    messages = []
    while True:
        try:
            message = input_fn("> ")
        except EOFError:
            output.write("\n")
            return
        command = message.strip()
        if command == "/quit":
            if not sys.stdin.isatty():  # piped input is not echoed: end the last "> " line ourselves
                output.write("\n")
            return
        if not command:
            continue
        if command.startswith("/") and len(command.split()) == 1:  # one word: a command, never a message
            if command == "/help":
                output.write("".join(f"  {name:8s}{what}\n" for name, what in CHAT_COMMANDS.items()))
            elif command == "/reset":
                messages = []
                output.write("(a new conversation)\n")
            else:
                output.write(f"unknown command {command}; /help lists the commands\n")
            continue
        messages, ids, dropped = fit_conversation(style, messages + [{"role": "user", "content": message}],
                                                  encode, budget)
        if dropped:
            output.write(f"(the conversation outgrew the {context}-token context: its oldest {dropped} "
                         f"exchange{'s' * (dropped > 1)} dropped)\n")
        stream = _TextStream(decode, output)
        generate(model, [ids], max_new_tokens, eos_id=eos_id, rng=rng, on_token=lambda i, t, s=stream: s.add(t),
                 **sampling)
        messages.append({"role": "assistant", "content": stream.finish().strip()})
