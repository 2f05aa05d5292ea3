"""LoRA on the Llama family against Hugging Face PEFT: PEFT's target names (q_proj ... down_proj, lm_head),
each a column slice of minisft's fused qkv_proj / gate_up_proj where fused.

The adapted forward and backward equal PEFT's under autograd (loss, every adapter's gradient); PEFT
loads the adapter minisft writes and minisft the one PEFT writes, with the same logits; merging
equals PEFT's merge_and_unload; and from the command line a LoRA run on a Llama folder resumes
bitwise and its adapter drives `minisft generate --adapter`.

Tolerances (norm-relative): loss 1e-5 and adapter gradients 1e-4 in float32, 1e-10 and 1e-9 in
float64 (where both models share the rotation angles and RMSNorm runs in the model's dtype, as in
tests/test_llama_model.py); logits of saved and loaded adapters 1e-5 (float32).
"""
import json

import h5py
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft", reason="peft is not installed (the hf extra: pip install 'minisft[hf]')")

from minisft import lora, memory  # noqa: E402
from minisft.errors import MinisftError  # noqa: E402
from minisft.llama import PRESETS, LlamaConfig, hf_array, hf_config, hf_layout  # noqa: E402
from minisft.model import GPT  # noqa: E402
from minisft.settings import Settings, validate  # noqa: E402
from minisft.train import checkpoints, finetune  # noqa: E402
from tests.helpers import (book_like_batch, interrupted_run, llama_settings, quiet, random_model,  # noqa: E402
                           read_metrics, rel_err, run_cli)
from tests.test_llama_model import hf_model, ours_from, same_angles_in_float64  # noqa: E402

ALL = lora.SCHEMES["llama"].every   # q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head
KINDS = ("llama-gqa-llama3-untied", "qwen3-qknorm-headdim")  # Qwen3: head_dim 12, so q is wider than d


def peft_name(part: lora.Part) -> str:
    """The PEFT module of one of our parts (each Llama part is an HF nn.Linear of its own)."""
    return "base_model.model." + ("lm_head" if part.prefix == "lm_head" else "model." + part.prefix)


def random_b(pm, seed=0):
    """PEFT's B starts at zero; random, the adapters change the outputs as after training."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)


def batch():
    return book_like_batch(np.random.default_rng(7), 96, [11, 7, 14])  # padded: -100 past each end


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype,tol_loss,tol_grad", [("float64", 1e-10, 1e-9), ("float32", 1e-5, 1e-4)])
def test_adapted_loss_and_every_adapter_gradient_equal_peft_under_autograd(kind, dtype, tol_loss, tol_grad):
    m = hf_model(kind, torch.float64 if dtype == "float64" else torch.float32)
    ours = ours_from(m, "numpy", dtype)
    if dtype == "float64":
        same_angles_in_float64(m, ours)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=6, target_modules=list(ALL)))
    random_b(pm)
    ad = lora.attach(ours, lora.LoraConfig(rank=4, alpha=6.0, targets=ALL))
    theirs = dict(pm.named_parameters())
    for p in ad.parts:  # PEFT's (r, in) / (out, r) -> ours (in, r) / (r, out)
        for ours_name, ab in ((p.a, "lora_A"), (p.b, "lora_B")):
            ours.params[ours_name] = theirs[f"{peft_name(p)}.{ab}.default.weight"].detach().numpy().T.copy()

    ids, targets = batch()
    logits = pm(input_ids=torch.tensor(ids)).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                torch.tensor(targets).reshape(-1), ignore_index=-100)
    hf_loss.backward()
    loss, grads = ours.loss_and_grad(ids, targets)
    assert abs(loss - hf_loss.item()) / hf_loss.item() <= tol_loss
    assert set(grads) == {n for p in ad.parts for n in (p.a, p.b)}  # the base stays frozen
    for p in ad.parts:
        for ours_name, ab in ((p.a, "lora_A"), (p.b, "lora_B")):
            err = rel_err(grads[ours_name], theirs[f"{peft_name(p)}.{ab}.default.weight"].grad.double().numpy().T)
            assert err <= tol_grad, f"{kind} {dtype}: d{ours_name} relative error {err:.2e}"


# ---- files both ways ------------------------------------------------------------------------------------
@pytest.fixture
def base(tmp_path):
    """An untied Llama folder (GQA, llama3 rope scaling, norm weights away from 1) written by transformers."""
    hf_model("llama-gqa-llama3-untied", torch.float32).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def hf_base(base):
    return transformers.LlamaForCausalLM.from_pretrained(base, attn_implementation="eager").eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()   # (B, T, V)


def ids():
    return np.random.default_rng(3).integers(0, 96, size=(2, 13))      # (B, T)


@pytest.mark.parametrize("targets,rslora", [(ALL, False), (lora.SCHEMES["llama"].default, True),
                                            (("k_proj", "up_proj", "down_proj"), False)])
def test_peft_loads_our_adapter_with_the_same_logits(tmp_path, base, targets, rslora):
    model = GPT.from_pretrained(base)
    ad = lora.attach(model, lora.LoraConfig(rank=4, alpha=6.0, targets=targets, rslora=rslora), seed=1,
                     base_path=base)
    rng = np.random.default_rng(0)
    for p in ad.parts:
        model.params[p.b] = rng.normal(0, 0.2, (p.rank, p.n_out)).astype(np.float32)
    lora.save_adapter(model, tmp_path / "ad")
    conf = json.loads((tmp_path / "ad" / lora.CONFIG_FILE).read_text())
    assert conf["fan_in_fan_out"] is False and conf["target_modules"] == sorted(targets)
    pm = peft.PeftModel.from_pretrained(hf_base(base), tmp_path / "ad").eval()
    x = ids()
    ours = model.logits(x)
    assert rel_err(hf_logits(pm, x), ours) <= 1e-5
    assert rel_err(ours, GPT.from_pretrained(base).logits(x)) > 1e-3  # the adapter really changes them


def peft_adapter(base, out, targets, **kw):
    pm = peft.get_peft_model(hf_base(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw))
    random_b(pm)
    pm.save_pretrained(out)
    return pm.eval()


@pytest.mark.parametrize("targets,kw", [(list(ALL), {}),
                                        (["q_proj", "v_proj"], dict(use_rslora=True,
                                                                    rank_pattern={"layers.1.self_attn.q_proj": 2}))])
def test_we_load_an_adapter_peft_wrote_with_the_same_logits(tmp_path, base, targets, kw):
    pm = peft_adapter(base, tmp_path / "peft", targets, **kw)
    model = GPT.from_pretrained(base)
    lora.load_adapter(model, tmp_path / "peft")
    x = ids()
    assert rel_err(model.logits(x), hf_logits(pm, x)) <= 1e-5


def test_our_merge_and_export_merge_equal_peft_merge_and_unload(tmp_path, base):
    pm = peft_adapter(base, tmp_path / "peft", list(ALL))
    x = ids()
    merged = pm.merge_and_unload()
    theirs = {k: v.numpy() for k, v in merged.state_dict().items()}
    model = GPT.from_pretrained(base)
    lora.load_adapter(model, tmp_path / "peft")
    cfg, ours = lora.merged_state_dict(model)
    for name, piece in hf_layout(cfg).items():
        want = theirs[name]
        np.testing.assert_allclose(hf_array(piece, ours[piece.ours]), want, rtol=0, atol=1e-6 * np.abs(want).max(),
                                   err_msg=name)
    r = run_cli("export", tmp_path / "peft", tmp_path / "merged", "--merge", "--weights", base)
    assert r.returncode == 0, r.stderr
    assert rel_err(hf_logits(hf_base(tmp_path / "merged"), x), hf_logits(merged, x)) <= 1e-5


def test_an_adapter_of_another_shape_or_family_is_refused_and_the_model_left_alone(tmp_path, base):
    peft_adapter(base, tmp_path / "peft", ["q_proj", "down_proj"])
    other = GPT(LlamaConfig(**{**PRESETS["llama-tiny"], "vocab_size": 96}))
    with pytest.raises(MinisftError, match="do not fit the base layer"):
        lora.load_adapter(other, tmp_path / "peft")
    gpt2 = random_model()
    lora.attach(gpt2, lora.LoraConfig(rank=2, alpha=2.0, targets=("c_attn", "c_fc")))
    lora.save_adapter(gpt2, tmp_path / "gpt2")
    (tmp_path / "gpt2" / lora.MINISFT_FILE).unlink()  # as PEFT writes it: only the tensor names tell
    with pytest.raises(MinisftError, match="is not a LoRA weight of a Llama-family linear layer"):
        lora.load_adapter(other, tmp_path / "gpt2")
    assert other.lora is None and not other.frozen


# ---- settings and memory -------------------------------------------------------------------------------
def test_gpt2_target_names_are_refused_on_a_llama_model_in_one_line(tmp_path, llama_folder, book_data):
    r = run_cli("finetune", "--weights", llama_folder, "--data", book_data, "--lora-rank", "4",
                "--lora-targets", "c_attn,q_proj", "--max-steps", "1", "--backend", "numpy", "--out", tmp_path / "run")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "unknown target 'c_attn' for a Llama-family model" in r.stderr and not (tmp_path / "run").exists()


def test_the_memory_estimate_counts_every_llama_adapter_and_nothing_of_the_frozen_base():
    cfg, r = LlamaConfig(**PRESETS["llama-tiny"]), 8
    lc = lora.LoraConfig(rank=r, alpha=8.0, targets=ALL)
    # Each adapter of an HF nn.Linear (out, in) holds r (in + out) values: counted on transformers' own model.
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(cfg)))
    n_adapter = sum(r * (mod.in_features + mod.out_features) for mod in hf.modules()
                    if isinstance(mod, torch.nn.Linear))
    full, ours = memory.estimate(cfg, 1000), memory.estimate(cfg, 1000, lora_config=lc)
    assert ours["gradients"] == 4 * n_adapter and ours["moments"] == 8 * n_adapter
    assert ours["weights"] == full["weights"] + 4 * n_adapter
    n_parts = 7 * cfg.n_layers + 1
    assert ours["activations"] == full["activations"] + 4 * 1000 * r * n_parts


# ---- the command line ------------------------------------------------------------------------------------
def test_a_cli_lora_run_on_a_llama_folder_writes_an_adapter_peft_and_generate_load(tmp_path, llama_folder,
                                                                                    book_data):
    r = run_cli("finetune", "--weights", llama_folder, "--data", book_data, "--lora-rank", "4", "--lora-targets",
                "all", "--max-steps", "3", "--batch-size", "2", "--lr", "1e-2", "--backend", "numpy",
                "--dtype", "float32", "--responses", "0", "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "trainable params:" in r.stdout
    adapter = tmp_path / "run" / "adapter"
    conf = json.loads((adapter / lora.CONFIG_FILE).read_text())
    assert conf["target_modules"] == sorted(ALL) and conf["fan_in_fan_out"] is False

    model = GPT.from_pretrained(llama_folder)
    lora.load_adapter(model, adapter)
    pm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(llama_folder), adapter).eval()
    x = np.random.default_rng(3).integers(0, model.cfg.vocab_size, size=(2, 13))
    assert rel_err(model.logits(x), hf_logits(pm, x)) <= 1e-5  # the head's adapter on a tied head too
    assert rel_err(model.logits(x), GPT.from_pretrained(llama_folder).logits(x)) > 1e-4  # it trained

    r = run_cli("generate", "--weights", llama_folder, "--adapter", adapter, "--data", book_data, "--split", "test",
                "--limit", "1", "--max-new-tokens", "5", "--backend", "numpy", "--out", tmp_path / "answers.json")
    assert r.returncode == 0, r.stderr
    assert len(json.load(open(tmp_path / "answers.json"))) == 1


def adapters_of(ckpt) -> dict:
    with h5py.File(ckpt, "r") as f:
        return {f"{g}/{n}": f[g][n][()] for g in ("params", "adam/m", "adam/v") for n in f[g]}


def test_a_resumed_llama_lora_run_equals_the_uninterrupted_one_bitwise(tmp_path, llama_folder, book_data,
                                                                       monkeypatch):
    kw = dict(max_steps=6, ckpt_every=2, eval_freq=3, batch_size=4, schedule="cosine", warmup_steps=1, lora_rank=4,
              lora_targets="all", lora_dropout=0.1)  # dropout: the resumed run must restore the RNG too
    whole = llama_settings(tmp_path / "whole", llama_folder, book_data, **kw)
    finetune(whole, log=quiet)
    part = llama_settings(tmp_path / "part", llama_folder, book_data, **kw)
    interrupted_run(part, monkeypatch, at_step=5)
    finetune(validate(Settings(**{**part.to_dict(), "resume": True})), log=quiet)
    assert read_metrics(part.out, measured=False) == read_metrics(whole.out, measured=False)
    a = adapters_of(checkpoints(tmp_path / "whole" / "run")[-1])
    b = adapters_of(checkpoints(tmp_path / "part" / "run")[-1])
    assert a.keys() == b.keys() and len(a) == 3 * 2 * (7 * 2 + 1) and all(np.array_equal(a[n], b[n]) for n in a)
