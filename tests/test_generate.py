"""Generation: the KV-cache kernels, cached decoding against the book's cache-less loop, sampling,
end-of-text, and the text helpers (book-style extraction, batched responses, streamed chat).

Cached vs uncached: identical greedy tokens on small random models, float64 and float32, on every
backend here, with prompts of different lengths decoded together and sequences running past the
context length. Kernel and logits checks: float64, <= 1e-12 relative.
"""
import io
import json

import numpy as np
import pytest

from minisft import GPT, GPTConfig, pack_sequences
from minisft.generate import (_TextStream, chat_loop, extract_book_response, generate, generate_responses,
                              generate_uncached, sample_next)
from minisft.judge import format_input  # the book's alpaca format_input
from minisft.prompts import get_style
from tests.helpers import ALL_BACKENDS, backend_or_skip, rel_err

TINY = dict(vocab_size=37, context_length=12, emb_dim=16, n_layers=2, n_heads=4)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    backend_or_skip(request.param, "float64")
    return request.param


def random_model(backend, dtype="float64", seed=0, **cfg):
    """A tiny model with every parameter random: weights N(0, 1), biases and layernorm parameters
    perturbed by N(0, 0.1). GPT-2's small init makes greedy decoding of a random model repeat one
    token; these logits are peaked and the tokens wander, so the cache is really exercised."""
    model = GPT(GPTConfig(**{**TINY, **cfg}), backend=backend, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 100)
    sd = {n: a + rng.normal(0, 0.1, a.shape) if n.endswith(".bias") or ".ln_" in n or "ln_f" in n
          else rng.normal(0, 1.0, a.shape) for n, a in model.state_dict().items()}
    model.load_state_dict(sd)
    return model


def random_prompts(lengths, V, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V, n).tolist() for n in lengths]


# ---- kernels --------------------------------------------------------------------------------------------
def test_cache_kernels_equal_full_attention(backend):
    """Writing a sequence's keys and values and attending one query over them = causal attention."""
    B = backend_or_skip(backend, "float64")
    rng = np.random.default_rng(0)
    H, hd, lengths, T = 3, 4, [5, 1, 8], 10
    d = H * hd
    cu = np.concatenate([[0], np.cumsum(lengths)])                        # (S+1,)
    qkv = rng.normal(size=(cu[-1], 3 * d))                                 # (N, 3d)
    full = B.to_numpy(B.attention_forward(B.from_numpy(qkv), B.index(cu), H, max(lengths))[0])  # (N, d)

    k_cache, v_cache = B.kv_cache_alloc(len(lengths), H, T, hd)
    assert B.to_numpy(k_cache).shape == (3, H, T, hd) and not B.to_numpy(k_cache).any()
    batch = pack_sequences([np.zeros(n) for n in lengths])
    seq_ids = np.repeat(np.arange(3), lengths)
    B.kv_cache_write(k_cache, v_cache, B.from_numpy(qkv), B.index(seq_ids), B.index(batch.positions))
    # The cache holds each sequence's keys and values at its positions, zeros beyond.
    k = B.to_numpy(k_cache)
    for s, (a, e) in enumerate(zip(cu[:-1], cu[1:])):
        np.testing.assert_array_equal(k[s, :, :e - a], qkv[a:e, d:2 * d].reshape(e - a, H, hd).transpose(1, 0, 2))
        assert not k[s, :, e - a:].any()
    # Decode every sequence's last position again: its query over the cache = the full attention row.
    last = cu[1:] - 1
    out = B.to_numpy(B.attention_decode(B.from_numpy(qkv[last]), k_cache, v_cache, B.index(np.array(lengths)),
                                        H, max(lengths)))                   # (S, d)
    assert rel_err(out, full[last]) <= 1e-13
    # One step further: a new token per row, written at position lens[s], attends over lens[s] + 1.
    new = rng.normal(size=(3, 3 * d))
    B.kv_cache_write(k_cache, v_cache, B.from_numpy(new), B.index(np.arange(3)), B.index(np.array(lengths)))
    out = B.to_numpy(B.attention_decode(B.from_numpy(new), k_cache, v_cache, B.index(np.array(lengths) + 1),
                                        H, max(lengths) + 1))
    for s, (a, e) in enumerate(zip(cu[:-1], cu[1:])):
        seq = np.concatenate([qkv[a:e], new[s:s + 1]])
        ref = B.to_numpy(B.attention_forward(B.from_numpy(seq), B.index(np.array([0, len(seq)])), H, len(seq))[0])
        assert rel_err(out[s], ref[-1]) <= 1e-13


def test_take_rows(backend):
    B = backend_or_skip(backend, "float64")
    x = np.random.default_rng(1).normal(size=(6, 2, 3))
    np.testing.assert_array_equal(B.to_numpy(B.take_rows(B.from_numpy(x), B.index(np.array([4, 0, 5])))),
                                  x[[4, 0, 5]])


def test_prefill_and_decode_logits_equal_recomputing_the_sequence(backend):
    model = random_model(backend)
    V = model.cfg.vocab_size
    prompts = random_prompts([4, 1, 7], V)
    cache = model.kv_cache(3, 10)
    logits = model.prefill(cache, pack_sequences(prompts))                 # (S, V)
    seqs = [list(p) for p in prompts]
    rng = np.random.default_rng(3)
    for _ in range(3):
        assert rel_err(logits, model.logits_last(pack_sequences(seqs))) <= 1e-12
        tokens = rng.integers(0, V, 3)
        for s, t in zip(seqs, tokens):
            s.append(int(t))
        logits = model.decode(cache, tokens)
    np.testing.assert_array_equal(cache.lens, [7, 4, 10])
    assert rel_err(logits, model.logits_last(pack_sequences(seqs))) <= 1e-12
    with pytest.raises(ValueError, match="full"):
        model.decode(cache, [1, 2, 3])   # row 2 holds 10 of 10 positions


# ---- cached == uncached ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cached_equals_uncached_greedy_across_the_context_length(backend, dtype):
    """Prompts of 3, 9, 1, 12 and 15 tokens decoded together, 14 new tokens: every sequence outgrows
    C = 12 at a different step (the 15-token prompt is cropped from the start) and then slides."""
    backend_or_skip(backend, dtype)
    model = random_model(backend, dtype)
    prompts = random_prompts([3, 9, 1, 12, 15], model.cfg.vocab_size)
    cached = generate(model, prompts, 14, eos_id=None)
    assert cached == generate_uncached(model, prompts, 14, eos_id=None)
    assert all(len(out) == 14 for out in cached)
    assert all(len(set(out)) >= 4 for out in cached)  # the models wander: a real test of the cache
    # Each prompt alone gives the same tokens as in the batch.
    for p, out in zip(prompts, cached):
        assert generate(model, [p], 14, eos_id=None) == [out]
        assert generate_uncached(model, [p], 14, eos_id=None) == [out]


def test_cached_equals_uncached_when_sampling(backend):
    model = random_model(backend, seed=4)
    prompts = random_prompts([5, 2, 11], model.cfg.vocab_size, seed=5)
    kw = dict(temperature=1.3, top_k=8, top_p=0.9, eos_id=None)
    assert generate(model, prompts, 16, rng=7, **kw) == generate_uncached(model, prompts, 16, rng=7, **kw)


def test_eos_stops_each_sequence_alone(backend):
    model = random_model(backend, seed=2, context_length=32)  # no sliding window here
    prompts = random_prompts([4, 6, 2], model.cfg.vocab_size, seed=9)
    free = generate(model, prompts, 10, eos_id=None)
    # An end-of-text id that sequence 0 emits at some step and sequence 2 never emits.
    eos = next(t for t in free[0][1:] if t not in free[2])
    cut = [out[:out.index(eos)] if eos in out else out for out in free]
    assert len(cut[0]) < 10 and cut[2] == free[2]

    seen = []
    decode = model.decode
    model.decode = lambda cache, tokens: (seen.append(len(tokens)), decode(cache, tokens))[1]
    assert generate(model, prompts, 10, eos_id=eos) == cut
    assert generate_uncached(model, prompts, 10, eos_id=eos) == cut
    # A stopped sequence leaves the batch: every decode step feeds only the ones still going.
    going = [sum(len(out) >= step for out in cut) for step in range(1, 10)]
    assert seen == [g for g in going if g]


def test_max_new_tokens_zero_and_one(backend):
    model = random_model(backend)
    prompts = random_prompts([3, 5], model.cfg.vocab_size)
    assert generate(model, prompts, 0) == [[], []] == generate_uncached(model, prompts, 0)
    one = generate(model, prompts, 1, eos_id=None)
    assert one == generate_uncached(model, prompts, 1, eos_id=None)
    assert [len(o) for o in one] == [1, 1]


def test_bad_requests_are_refused():
    model = random_model("numpy")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(ValueError, match="no prompts"):
        generate(model, [], 3)
    logits = np.zeros((1, 5))
    with pytest.raises(ValueError, match="top_k"):
        sample_next(logits, np.random.default_rng(0), 1.0, top_k=6)
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, np.random.default_rng(0), 1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, np.random.default_rng(0), -1.0)


# ---- sampling ---------------------------------------------------------------------------------------------
def test_sampling_is_deterministic_for_a_seed():
    model = random_model("numpy", seed=1)
    prompts = random_prompts([4, 7], model.cfg.vocab_size)
    kw = dict(temperature=1.0, eos_id=None)
    a = generate(model, prompts, 12, rng=123, **kw)
    assert a == generate(model, prompts, 12, rng=123, **kw)
    assert a != generate(model, prompts, 12, rng=124, **kw)


def draws(logits_row, n, **kw):
    """n samples from one row of logits (the row repeated n times: one draw each)."""
    return sample_next(np.tile(logits_row, (n, 1)), np.random.default_rng(42), **kw)


def assert_frequencies(samples, probs, n):
    """Empirical frequencies within 5 standard errors of probs (a fixed seed: no flakiness)."""
    freq = np.bincount(samples, minlength=len(probs)) / n
    se = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs) <= 5 * se + 1e-12), (freq, probs)


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_greedy_is_argmax_and_temperature_scales():
    logits = np.random.default_rng(0).normal(size=(6, 40)) * 2
    np.testing.assert_array_equal(sample_next(logits, np.random.default_rng(0)), logits.argmax(-1))
    row, n = logits[0], 20000
    assert_frequencies(draws(row, n, temperature=0.7), softmax(row / 0.7), n)


def test_top_k_never_leaves_the_k_most_likely():
    row = np.random.default_rng(1).normal(size=50) * 1.5
    k, n = 5, 20000
    s = draws(row, n, temperature=1.0, top_k=k)
    top = np.argsort(-row)[:k]
    assert set(s.tolist()) == set(top.tolist())  # only the top k, and all of them
    expect = np.zeros(50)
    expect[top] = softmax(row[top])
    assert_frequencies(s, expect, n)
    assert set(draws(row, 500, temperature=1.0, top_k=1).tolist()) == {int(row.argmax())}


def test_top_p_keeps_the_nucleus():
    probs = np.array([0.05, 0.5, 0.02, 0.3, 0.1, 0.03])
    row, n = np.log(probs), 20000
    # 0.5 < 0.75 <= 0.5 + 0.3: the nucleus is tokens 1 and 3 (the one crossing 0.75 included).
    s = draws(row, n, temperature=1.0, top_p=0.75)
    assert set(s.tolist()) == {1, 3}
    assert_frequencies(s, np.array([0, 0.5, 0, 0.3, 0, 0]) / 0.8, n)
    assert set(draws(row, 500, temperature=1.0, top_p=0.4).tolist()) == {1}  # the top token always stays
    # top_k then top_p: k = 2 leaves {1: 0.625, 3: 0.375}; p = 0.6 keeps token 1 alone.
    assert set(draws(row, 500, temperature=1.0, top_k=2, top_p=0.6).tolist()) == {1}


# ---- text ----------------------------------------------------------------------------------------------------
def test_book_extraction_recovers_the_responses(data_dir):
    """The book's fine-tuned model wrote "prompt + \\n\\n### Response:\\n + answer"; extraction must give
    back exactly the answers stored in instruction-data-with-response.json."""
    entries = json.loads((data_dir / "instruction-data-with-response.json").read_text())
    assert len(entries) == 110
    for e in entries:
        prompt = format_input(e)
        generated = prompt + "\n\n### Response:\n" + e["model_response"] + "\n"
        assert extract_book_response(generated, prompt) == e["model_response"]
    assert extract_book_response("Q\n\n### Response:\n  ", "Q") == ""


def test_generate_responses_batches_and_decodes(tiktoken_gpt2):
    model = random_model("numpy", vocab_size=50257, context_length=64, seed=3)
    enc = lambda s: tiktoken_gpt2.encode(s, allowed_special={"<|endoftext|>"})  # noqa: E731
    prompts = ["### Instruction:\nName a color.\n\n### Response:\n", "Hi", "A longer prompt, with more words in it."]
    out = generate_responses(model, prompts, enc, tiktoken_gpt2.decode, 6, batch_size=2, eos_id=None, progress=False)
    ids = generate(model, [enc(p) for p in prompts], 6, eos_id=None)
    assert out == [tiktoken_gpt2.decode(i).strip() for i in ids]
    book = generate_responses(model, prompts, enc, tiktoken_gpt2.decode, 6, batch_size=3, book_prompt=True,
                              eos_id=None, progress=False)
    assert book == [extract_book_response(tiktoken_gpt2.decode(enc(p) + i), p) for p, i in zip(prompts, ids)]


def test_stream_holds_back_split_characters(tiktoken_gpt2):
    text = "naïve 日本語 🙂"
    ids = tiktoken_gpt2.encode(text)
    assert any("\ufffd" in tiktoken_gpt2.decode(ids[:k]) for k in range(1, len(ids)))  # a character spans tokens
    out = io.StringIO()
    s = _TextStream(tiktoken_gpt2.decode, out)
    for t in ids:
        s.add(t)
        assert "\ufffd" not in out.getvalue()
    assert s.finish() == text and out.getvalue() == text + "\n"


def test_chat_loop_streams_each_reply_to_the_conversation_so_far(tiktoken_gpt2):
    model = random_model("numpy", vocab_size=50257, context_length=128, seed=5)
    style, enc, dec = get_style("alpaca"), tiktoken_gpt2.encode, tiktoken_gpt2.decode
    conversation, replies = [], []
    for m in ["hello", "again"]:  # greedy: what chat_loop must print, each reply to the whole conversation
        conversation.append({"role": "user", "content": m})
        replies.append(dec(generate(model, [enc(style.prompt(conversation))], 5, eos_id=None)[0]))
        conversation.append({"role": "assistant", "content": replies[-1].strip()})
    inputs = iter(["hello", "  ", "again", "/quit", "never read"])
    asked, out = [], io.StringIO()

    def fake_input(prompt):
        asked.append(prompt)
        return next(inputs)
    chat_loop(model, style, enc, dec, input_fn=fake_input, output=out, max_new_tokens=5, eos_id=None)
    assert out.getvalue() == replies[0] + "\n" + replies[1] + "\n" + "\n"  # stdin is no terminal here: the
    # "> " of /quit was not echoed, so its line is ended
    assert asked == ["> "] * 4

    def eof(prompt):
        raise EOFError
    out = io.StringIO()
    chat_loop(model, style, enc, dec, input_fn=eof, output=out)
    assert out.getvalue() == "\n"


def test_generate_responses_off_a_terminal_writes_plain_progress_lines(tiktoken_gpt2, capsys, monkeypatch):
    """Captured stderr is no terminal (a log file, CI): plain lines, no tqdm bar's carriage returns."""
    import minisft.progress
    monkeypatch.setattr(minisft.progress, "PLAIN_EVERY_S", 0.0)  # a line at every update
    model = random_model("numpy", vocab_size=50257, context_length=64, seed=3)
    generate_responses(model, ["Hi", "Name a color.", "A third prompt."], tiktoken_gpt2.encode, tiktoken_gpt2.decode,
                       3, batch_size=2, eos_id=None)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert [ln.split(" (")[0] for ln in err.splitlines()] == ["generating: 2/3 prompts", "generating: 3/3 prompts"]


def test_chat_commands_are_never_sent_to_the_model(tiktoken_gpt2):
    model = random_model("numpy", vocab_size=50257, context_length=128, seed=5)
    style, enc, dec = get_style("alpaca"), tiktoken_gpt2.encode, tiktoken_gpt2.decode
    alone = dec(generate(model, [enc(style.prompt([{"role": "user", "content": "again"}]))], 5, eos_id=None)[0])
    inputs = iter(["/help", "hello", "/reset", "/nonsense", "again", "/quit"])
    out = io.StringIO()
    chat_loop(model, style, enc, dec, input_fn=lambda _: next(inputs), output=out, max_new_tokens=5, eos_id=None)
    text = out.getvalue()
    assert all(f"  {name}" in text for name in ("/help", "/reset", "/quit"))  # /help lists them
    assert "(a new conversation)" in text and "unknown command /nonsense; /help lists the commands" in text
    assert text.endswith(alone + "\n\n")  # after /reset, "again" is answered as if it came first


def test_chat_drops_the_oldest_exchanges_to_fit_the_context_and_says_so(tiktoken_gpt2, monkeypatch):
    import minisft.generate as gen

    model = random_model("numpy", vocab_size=50257, context_length=128, seed=5)
    style, enc, dec = get_style("alpaca"), tiktoken_gpt2.encode, tiktoken_gpt2.decode
    said = ["Tell me about " + "cats " * 20, "Tell me about " + "dogs " * 20, "Tell me about " + "owls " * 20]
    prompts, replies = [], []

    def recording(model, ids, *args, **kw):  # what chat_loop feeds the model, and what it answers
        new = generate(model, ids, *args, **kw)
        prompts.append(ids[0])
        replies.append(dec(new[0]).strip())
        return new
    monkeypatch.setattr(gen, "generate", recording)
    inputs, out = iter([*said, "/quit"]), io.StringIO()
    chat_loop(model, style, enc, dec, input_fn=lambda _: next(inputs), output=out, max_new_tokens=4, eos_id=None)
    user = [{"role": "user", "content": m} for m in said]
    answer = [{"role": "assistant", "content": r} for r in replies]
    budget = 128 - 4
    assert len(enc(style.prompt([user[0], answer[0], user[1], answer[1], user[2]]))) > budget  # all: too long
    assert prompts == [enc(style.prompt(user[:1])), enc(style.prompt([user[0], answer[0], user[1]])),
                       enc(style.prompt([user[1], answer[1], user[2]]))]  # the oldest exchange dropped
    assert all(len(p) <= budget for p in prompts)
    assert "(the conversation outgrew the 128-token context: its oldest 1 exchange dropped)" in out.getvalue()
