"""`minisft finetune --weights DIR` on a Llama-family folder: a tiny random LlamaForCausalLM with a real
tokenizer.json (byte-level BPE built with the `tokenizers` library on the book's data; the llama_folder
fixture of tests/conftest.py). The run's
per-step losses equal an independent loop (transformers' own model, torch.optim.AdamW, the book's
padded batches) and a resumed run equals the uninterrupted one bitwise; its hf/ export is a whole
folder that transformers and `minisft generate` load."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from minisft.checkpoint import load_checkpoint  # noqa: E402
from minisft.data import Loader, collate_padded, encode_records, load_records, split_dataset  # noqa: E402
from minisft.settings import Settings, validate  # noqa: E402
from minisft.tokenizer import HFTokenizer  # noqa: E402
from minisft.train import checkpoints, finetune  # noqa: E402
from tests.helpers import interrupted_run, llama_settings, quiet, read_metrics, run_cli  # noqa: E402


def test_twenty_steps_equal_transformers_llama_with_torch_adamw(tmp_path, llama_folder, book_data):
    s = llama_settings(tmp_path, llama_folder, book_data, max_steps=20, batch_size=4)
    finetune(s, log=quiet)
    ours = [r["loss"] for r in read_metrics(s.out) if r["kind"] == "step"]

    tok = HFTokenizer(llama_folder)
    peer = transformers.LlamaForCausalLM.from_pretrained(llama_folder, attn_implementation="eager")
    opt = torch.optim.AdamW(peer.parameters(), lr=1e-3, weight_decay=0.1)
    train = encode_records(split_dataset(load_records(s.data)).train, tok=tok)
    loader = Loader(train, 4, shuffle=True, drop_last=True, seed=s.seed,
                    collate=lambda ex: collate_padded([e.tokens for e in ex], tok.eos, allowed_max_length=512))
    theirs = []
    for inputs, targets in loader:
        opt.zero_grad()
        logits = peer(input_ids=torch.from_numpy(inputs)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.from_numpy(targets).reshape(-1), ignore_index=-100)
        loss.backward()
        opt.step()
        theirs.append(loss.item())
        if len(theirs) == 20:
            break
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert ours[-1] < ours[0]  # it learns


def test_a_resumed_llama_run_equals_the_uninterrupted_one_bitwise(tmp_path, llama_folder, book_data,
                                                                  monkeypatch):
    kw = dict(max_steps=6, ckpt_every=2, eval_freq=3, batch_size=4, schedule="cosine", warmup_steps=1)
    whole = llama_settings(tmp_path / "whole", llama_folder, book_data, **kw)
    finetune(whole, log=quiet)
    part = llama_settings(tmp_path / "part", llama_folder, book_data, **kw)
    interrupted_run(part, monkeypatch, at_step=5)
    finetune(validate(Settings(**{**part.to_dict(), "resume": True})), log=quiet)
    assert read_metrics(part.out, measured=False) == read_metrics(whole.out, measured=False)
    a = load_checkpoint(checkpoints(tmp_path / "whole" / "run")[-1])[0].state_dict()
    b = load_checkpoint(checkpoints(tmp_path / "part" / "run")[-1])[0].state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)


def test_the_export_is_a_whole_folder_transformers_and_generate_load(tmp_path, llama_folder, book_data):
    s = llama_settings(tmp_path, llama_folder, book_data, max_steps=2, batch_size=4, responses=2)
    finetune(s, log=quiet)
    hf = tmp_path / "run" / "hf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in hf.iterdir()}
    responses = json.load(open(tmp_path / "run" / "instruction-data-with-response.json"))
    assert len(responses) == 2 and all(isinstance(r["model_response"], str) for r in responses)
    m = transformers.AutoModelForCausalLM.from_pretrained(hf)
    assert type(m).__name__ == "LlamaForCausalLM"
    r = run_cli("generate", "--weights", hf, "--data", book_data, "--split", "test", "--limit", "1",
                "--max-new-tokens", "5", "--backend", "numpy", "--out", tmp_path / "answers.json")
    assert r.returncode == 0, r.stderr
    assert len(json.load(open(tmp_path / "answers.json"))) == 1


@pytest.mark.parametrize("option", [dict(grad_checkpoint=True), dict(fused_update=True),
                                    dict(grad_checkpoint=True, fused_update=True)],
                         ids=["grad-checkpoint", "fused-update", "both"])
def test_the_memory_options_train_a_llama_model_bitwise_like_the_plain_run(tmp_path, llama_folder, book_data,
                                                                           option):
    """float64, as the GPT-2 checks: recomputing a block repeats the same arithmetic (float32 BLAS may
    round a matmul differently on freshly allocated operands). Losses and weights are bit-identical;
    the gradient norm a fused update sums tensor by tensor as each completes, in another order."""
    kw = dict(max_steps=4, batch_size=4, eval_freq=2, dtype="float64")
    plain = llama_settings(tmp_path / "plain", llama_folder, book_data, **kw)
    lean = llama_settings(tmp_path / "lean", llama_folder, book_data, **kw, **option)
    finetune(plain, log=quiet)
    finetune(lean, log=quiet)
    ra, rb = read_metrics(plain.out, measured=False), read_metrics(lean.out, measured=False)
    norms = [(x.pop("grad_norm", None), y.pop("grad_norm", None)) for x, y in zip(ra, rb)]
    assert rb == ra and all(x == y or abs(x - y) <= 1e-12 * x for x, y in norms)
    a = load_checkpoint(checkpoints(tmp_path / "plain" / "run")[-1])[0].state_dict()
    b = load_checkpoint(checkpoints(tmp_path / "lean" / "run")[-1])[0].state_dict()
    assert all(np.array_equal(a[n], b[n]) for n in a)


def test_lean_adamw_moments_train_a_llama_model_close_to_fp32(tmp_path, llama_folder, book_data):
    kw = dict(max_steps=6, batch_size=4, eval_freq=100)
    runs = {}
    for state in ("fp32", "bf16", "8bit"):
        s = llama_settings(tmp_path / state, llama_folder, book_data, optim_state=state, **kw)
        finetune(s, log=quiet)
        runs[state] = [r["loss"] for r in read_metrics(s.out) if r["kind"] == "step"]
    for state in ("bf16", "8bit"):
        np.testing.assert_allclose(runs[state], runs["fp32"], rtol=1e-2)


def test_eval_loss_equals_transformers_loss_on_the_same_split(llama_folder, book_data):
    r = run_cli("eval", "--weights", llama_folder, "--data", book_data, "--split", "val", "--json",
                "--backend", "numpy", "--dtype", "float64")
    assert r.returncode == 0, r.stderr
    ours = json.loads(r.stdout)
    tok = HFTokenizer(llama_folder)
    peer = transformers.LlamaForCausalLM.from_pretrained(llama_folder, attn_implementation="sdpa").double()
    val = encode_records(split_dataset(load_records(book_data)).val, tok=tok)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(val), 8):
            inputs, targets = collate_padded([e.tokens for e in val[start:start + 8]], tok.eos)
            logits = peer(input_ids=torch.from_numpy(inputs)).logits
            t = torch.from_numpy(targets).reshape(-1)
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t, ignore_index=-100,
                                                       reduction="sum").item()
            count += int((t != -100).sum())
    assert ours["targets"] == count
    assert abs(ours["loss"] - total / count) <= 1e-6 * total / count  # transformers' RMSNorm and angles: float32


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-merged"])
def test_export_of_a_llama_checkpoint_carries_the_tokenizer_and_generates(tmp_path, llama_folder, book_data, lora):
    kw = dict(lora_rank=4, lora_targets="all") if lora else {}
    s = llama_settings(tmp_path, llama_folder, book_data, max_steps=2, batch_size=4, **kw)
    finetune(s, log=quiet)
    out = tmp_path / "exported"
    r = run_cli("export", checkpoints(tmp_path / "run")[-1], out, *(["--merge"] if lora else []))
    assert r.returncode == 0, r.stderr
    assert (out / "tokenizer.json").read_bytes() == (llama_folder / "tokenizer.json").read_bytes()
    r = run_cli("generate", "--weights", out, "--data", book_data, "--split", "test", "--limit", "1",
                "--max-new-tokens", "3", "--backend", "numpy", "--out", tmp_path / "answers.json")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("template", [None, "chatml"], ids=["prompt-style", "chat-template"])
def test_serve_answers_the_openai_client_with_a_llama_model_as_its_own_generate(llama_folder, template):
    """The server encodes with the model's tokenizer (a chat template's control tokens as tokens) and
    stops at its end ids: the official client's answers equal minisft's greedy generate on the prompt."""
    import threading

    import openai

    from minisft.chat_template import prompt_format
    from minisft.generate import generate
    from minisft.model import GPT
    from minisft.serve import Server
    style, tok = prompt_format("chatml" if template is None else None, template, HFTokenizer(llama_folder))
    model = GPT.from_pretrained(llama_folder, dtype="float64")
    server = Server(model, style, tok=tok, port=0, model_name="tiny-llama")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for text in ("Name a color.", "Rewrite: the cat sat."):
            messages = [{"role": "user", "content": text}]
            reply = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=6,
                                                   temperature=0)
            ids = tok.encode(style.prompt(messages))
            assert reply.choices[0].message.content == tok.decode(generate(model, [ids], 6, eos_id=tok.stops)[0])
            assert reply.usage.prompt_tokens == len(ids)
    finally:
        server.close()
