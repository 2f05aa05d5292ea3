"""Chat templates (minisft.chat_template): our rendering equals transformers' apply_chat_template (text and
ids) for every built-in; masks from prefix renderings train exactly the assistant spans and their end
tokens; each silently wrong mask is refused with its line; a tiny Llama folder fine-tunes on multi-turn
OpenAI-messages data with a template."""
import json
import shutil

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
jinja2 = pytest.importorskip("jinja2")
pytest.importorskip("torch")

from minisft.chat_template import BUILTIN, CHATML, check_masks, prompt_format  # noqa: E402
from minisft.data import encode_records  # noqa: E402
from minisft.errors import MinisftError  # noqa: E402
from minisft.settings import Settings  # noqa: E402
from minisft.tokenizer import HFTokenizer  # noqa: E402
from minisft.train import finetune  # noqa: E402
from tests.helpers import quiet, read_metrics  # noqa: E402
from tests.helpers import llama_settings  # noqa: E402

CONVERSATION = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Grüße! What is 世界?"},
                {"role": "assistant", "content": "It means “world” — naïve café."},
                {"role": "user", "content": "And again?"},
                {"role": "assistant", "content": "World, again."}]


@pytest.fixture(scope="module")
def tok(llama_folder):
    return HFTokenizer(llama_folder)


# template -> (its control tokens the fixture's tokenizer lacks, bos_token, eos_token), as the model's tokenizer
# has them: Mistral v0.2's "[INST]" is text, not a token; Phi-3's eos is "<|endoftext|>"
CONTROL = {"chatml": ([], None, "<|endoftext|>"), "smollm2": ([], None, "<|endoftext|>"),
           "qwen2.5": ([], None, "<|endoftext|>"),
           "llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                      "<|begin_of_text|>", "<|eot_id|>"),
           "mistral": (["<s>", "</s>"], "<s>", "</s>"),
           "phi3": (["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|endoftext|>"),
           "gemma": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>")}
# what each template trains of an assistant turn with content {c}: its text up to and with its end token
TRAINED = {"chatml": "{c}<|im_end|>", "smollm2": "{c}<|im_end|>", "qwen2.5": "{c}<|im_end|>",
           "llama3": "{c}<|eot_id|>", "mistral": " {c}</s>", "phi3": "{c}<|end|>", "gemma": "{c}<end_of_turn>"}


@pytest.fixture(scope="module")
def template_folders(llama_folder, tmp_path_factory):
    """template -> a copy of the fixture's tokenizer with that template's control tokens added as special
    tokens (so its ids compare meaningfully with transformers'), and its bos / eos in tokenizer_config.json."""
    tokenizers = pytest.importorskip("tokenizers")
    folders = {}
    for name, (added, bos, eos) in CONTROL.items():
        folder = tmp_path_factory.mktemp(f"tok-{name}")
        t = tokenizers.Tokenizer.from_file(str(llama_folder / "tokenizer.json"))
        t.add_special_tokens([tokenizers.AddedToken(a, special=True, normalized=False) for a in added])
        t.save(str(folder / "tokenizer.json"))
        config = {"eos_token": eos, "tokenizer_class": "PreTrainedTokenizerFast", **({"bos_token": bos} if bos else {})}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        folders[name] = folder
    return folders


def hf_tokenizer(folder, template):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                                eos_token=config["eos_token"], bos_token=config.get("bos_token"),
                                                chat_template=template)


def hf_ids(hf, messages, **kw):
    ids = hf.apply_chat_template(messages, tokenize=True, **kw)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


UNALTERNATING = [{"role": "user", "content": "One?"}, {"role": "user", "content": "Two?"},
                 {"role": "assistant", "content": "Both."}]


@pytest.mark.parametrize("name", list(BUILTIN))
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:], CONVERSATION[:4], UNALTERNATING],
                         ids=["system", "no-system", "ends-with-user", "user-user"])
def test_rendering_equals_apply_chat_template(name, messages, template_folders):
    folder = template_folders[name]
    template, ttok = prompt_format(None, name, HFTokenizer(folder))
    hf = hf_tokenizer(folder, BUILTIN[name])
    gen = messages[-1]["role"] == "user"
    try:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    except jinja2.exceptions.TemplateError as e:  # a conversation the template refuses (Gemma's system role)
        with pytest.raises(MinisftError) as refused:
            encode_records([{"messages": messages}], template, "assistant", ttok)
        assert str(refused.value) == f"record 0: chat template {name}: {e}"
        with pytest.raises(MinisftError, match=f"^chat template {name}: ") as refused:
            template.render(messages, add_generation_prompt=gen)
        assert str(refused.value) == f"chat template {name}: {e}" and "\n" not in str(refused.value)
        return
    ours = template.render(messages, add_generation_prompt=gen)
    assert ours == expected
    assert ttok.encode(ours) == hf_ids(hf, messages, add_generation_prompt=gen)
    end = ttok.tok.token_to_id(template.end)
    assert template.end == TRAINED[name].format(c="").strip() and end is not None  # one token
    if gen:
        assert ttok.encode(template.prompt(messages)) == hf_ids(hf, messages, add_generation_prompt=True)
    else:  # training encodes the same ids, and generation stops at the template's one end token
        ex = encode_records([{"messages": messages}], template, "assistant", ttok)[0]
        assert list(ex.tokens) == hf_ids(hf, messages)
        assert end in ttok.stops


@pytest.mark.parametrize("name", list(BUILTIN))
def test_three_turns_train_each_templates_assistant_spans_and_end_tokens(name, template_folders):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one"},
                {"role": "user", "content": "more"}, {"role": "assistant", "content": "two"},
                {"role": "user", "content": "last"}, {"role": "assistant", "content": "three"}]
    folder = template_folders[name]
    template, ttok = prompt_format(None, name, HFTokenizer(folder))
    ex = encode_records([{"messages": messages}], template, "assistant", ttok)[0]
    assert list(ex.tokens) == hf_ids(hf_tokenizer(folder, BUILTIN[name]), messages)
    runs, run = [], []  # the trained tokens, as runs of consecutive ones
    for t, k in zip(ex.tokens, ex.trained):
        if k:
            run.append(int(t))
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    spans = [TRAINED[name].format(c=m["content"]) for m in messages if m["role"] == "assistant"]
    assert runs == [ttok.encode(s) for s in spans]  # token by token: each turn's text and end token, nothing else
    end = ttok.tok.token_to_id(template.end)
    assert sum(int(t) == end and bool(k) for t, k in zip(ex.tokens, ex.trained)) == 3
    lines = []
    check_masks(template, [("train", [{"messages": messages}], [ex])], ttok, Settings(), lines.append)
    assert lines == []


def test_generation_markers_give_transformers_assistant_mask(tok, llama_folder):
    marked = CHATML.replace("{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}",
                            "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}"
                            "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
                            "{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}")
    path = llama_folder.parent / "marked.jinja"
    path.write_text(marked)
    template, ttok = prompt_format(None, str(path), tok)
    ex = encode_records([{"messages": CONVERSATION}], template, "assistant", ttok)[0]
    out = hf_tokenizer(llama_folder, marked).apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(ex.tokens) == list(out["input_ids"])
    assert list(ex.trained[1:]) == [bool(m) for m in out["assistant_masks"][1:]]


def test_three_turns_without_markers_train_exactly_the_assistant_spans(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "one"},
                {"role": "user", "content": "more"}, {"role": "assistant", "content": "two"},
                {"role": "user", "content": "last"}, {"role": "assistant", "content": "three"}]
    template, ttok = prompt_format(None, "chatml", tok)
    ex = encode_records([{"messages": messages}], template, "assistant", ttok)[0]
    expected = []  # by hand: the turn's text untrained, its content and <|im_end|> trained, "\n" not
    for m in messages:
        head = ttok.encode(f"<|im_start|>{m['role']}\n")
        body = ttok.encode(m["content"] + "<|im_end|>")
        expected += [(t, False) for t in head] + [(t, m["role"] == "assistant") for t in body]
        expected += [(t, False) for t in ttok.encode("\n")]
    assert [(int(t), bool(k)) for t, k in zip(ex.tokens, ex.trained)] == expected
    end = tok.tok.token_to_id("<|im_end|>")
    assert sum(int(t) == end and bool(k) for t, k in zip(ex.tokens, ex.trained)) == 3


REFUSALS = {  # template -> (the line's words, the flag that allows it)
    "untrained": ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                  "{% for m in messages if m['role'] == 'zzz' %}{% generation %}{% endgeneration %}{% endfor %}",
                  "train no token at all", "allow_untrained_records"),
    "empty_turn": ("{% for m in messages %}{% if m['role'] == 'assistant' and loop.index0 == 1 %}"
                   "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}"
                   "<|im_end|>{% endif %}{% endfor %}",
                   "have an assistant turn that trains no token", "allow_empty_turns"),
    "end": ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}",
            "end token", "allow_untrained_end"),
    "unstable": ("{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}{{ m['content'] }}"
                 "<|im_end|>{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
                 "not prefix-stable", "allow_unstable_template"),
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_each_silent_failure_is_refused_with_its_line(kind, tok, llama_folder):
    source, words, flag = REFUSALS[kind]
    path = llama_folder.parent / f"{kind}.jinja"
    path.write_text(source)
    template, ttok = prompt_format(None, str(path), tok)
    records = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:]}]
    examples = encode_records(records, template, "assistant", ttok)
    lines = []
    with pytest.raises(MinisftError, match="--" + flag.replace("_", "-")):
        check_masks(template, [("train", records, examples)], ttok, Settings(), lines.append)
    line = next(x for x in lines if words in x)
    assert line.startswith("error: 2 of 2 train records") and "(first: train record 0)" in line
    every_flag = {f: True for _, _, f in REFUSALS.values()}  # allowed, the lines are warnings and it trains
    check_masks(template, [("train", records, examples)], ttok, Settings(**every_flag), quiet)


def test_a_control_token_inside_a_message_is_refused(tok):
    template, ttok = prompt_format(None, "chatml", tok)
    bad = [{"role": "user", "content": "hi <|im_end|>"}, {"role": "assistant", "content": "x"}]
    with pytest.raises(MinisftError, match=r"record 0: message 0 holds '<\|im_end\|>'"):
        encode_records([{"messages": bad}], template, "assistant", ttok)


def test_twenty_steps_on_multi_turn_messages_with_the_folders_template(tmp_path, llama_folder):
    folder = tmp_path / "with-template"
    shutil.copytree(llama_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": BUILTIN["smollm2"]}))
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "what", "is", "this", "café"]
    data = [{"messages": [{"role": "user" if j % 2 == 0 else "assistant",
                           "content": " ".join(rng.choice(words, 5))} for j in range(4)]} for _ in range(40)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    s = llama_settings(tmp_path, folder, str(path), max_steps=20, epochs=3, batch_size=4, eval_freq=10,
                       responses=0)
    assert s.chat_template == "model" and s.mask_prompt == "assistant" and s.prompt_style is None
    finetune(s, log=quiet)
    losses = [r["loss"] for r in read_metrics(s.out) if r["kind"] == "step"]
    assert len(losses) == 20 and all(np.isfinite(losses)) and losses[-1] < losses[0]
