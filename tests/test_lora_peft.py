"""LoRA adapters against Hugging Face PEFT (the `hf` extra): PEFT loads the adapter minisft writes and
computes the same logits (<= 1e-5 relative), minisft loads an adapter PEFT wrote, merging equals
PEFT's merge_and_unload, and `minisft export --merge` / `--adapter` work from the command line."""
import json

import numpy as np
import pytest

from minisft import GPT, AdamW
from minisft import lora
from tests.helpers import rel_err
from tests.helpers import random_model, run_cli, token_ids

torch = pytest.importorskip("torch", reason="torch is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (the hf extra)")
peft = pytest.importorskip("peft", reason="peft is not installed (the hf extra: pip install 'minisft[hf]')")

EVERY = ("c_attn.q", "c_attn.v", "attn.c_proj", "c_fc", "mlp.c_proj", "lm_head")


def base_folder(tmp_path, tie=False):
    model = random_model(tie_embeddings=tie, seed=4, scale=10.0)
    model.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def our_adapter(base, targets, rslora=False, seed=0):
    """The base from its folder, with adapters whose B is random (as after training)."""
    model = GPT.from_pretrained(base)
    ad = lora.attach(model, lora.LoraConfig(rank=4, alpha=6.0, targets=targets, rslora=rslora), seed=1,
                     base_path=base)
    rng = np.random.default_rng(seed)
    for p in ad.parts:
        model.params[p.b] = rng.normal(0, 0.2, (p.rank, p.n_out)).astype(np.float32)
    return model


def hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.from_numpy(ids)).logits.numpy()  # (B, T, V)


@pytest.mark.parametrize("targets,rslora", [(EVERY, False), (("c_attn", "c_fc"), True), (("c_attn.k",), False)])
def test_peft_loads_our_adapter_with_the_same_logits(tmp_path, targets, rslora):
    base = base_folder(tmp_path)
    model = our_adapter(base, targets, rslora)
    lora.save_adapter(model, tmp_path / "ad")
    conf = json.loads((tmp_path / "ad" / lora.CONFIG_FILE).read_text())
    assert conf["fan_in_fan_out"] is True and conf["peft_type"] == "LORA"
    hf = transformers.GPT2LMHeadModel.from_pretrained(base)
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ad").eval()
    ids = token_ids()
    ours = model.logits(ids)
    assert rel_err(hf_logits(pm, ids), ours) <= 1e-5
    assert rel_err(ours, GPT.from_pretrained(base).logits(ids)) > 1e-3  # the adapter really changes them


def peft_adapter(base, tmp_path, targets, **kw):
    hf = transformers.GPT2LMHeadModel.from_pretrained(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True, **kw)
    pm = peft.get_peft_model(hf, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    pm.save_pretrained(tmp_path / "peft")
    return pm.eval()


@pytest.mark.parametrize("targets,kw", [(["c_attn", "c_proj", "c_fc", "lm_head"], {}),
                                        (["c_attn"], dict(use_rslora=True, rank_pattern={"h.1.attn.c_attn": 2}))])
def test_we_load_an_adapter_peft_wrote(tmp_path, targets, kw):
    base = base_folder(tmp_path)
    pm = peft_adapter(base, tmp_path, targets, **kw)
    model = GPT.from_pretrained(base)
    lora.load_adapter(model, tmp_path / "peft")
    ids = token_ids()
    assert rel_err(model.logits(ids), hf_logits(pm, ids)) <= 1e-5


def test_our_merge_equals_peft_merge_and_unload(tmp_path):
    base = base_folder(tmp_path)
    pm = peft_adapter(base, tmp_path, ["c_attn", "c_proj", "c_fc", "lm_head"])
    theirs = {k: v.numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    model = GPT.from_pretrained(base)
    lora.load_adapter(model, tmp_path / "peft")
    _, ours = lora.merged_state_dict(model)
    for n, a in ours.items():
        want = theirs[n if n == "lm_head.weight" else "transformer." + n]
        np.testing.assert_allclose(a, want, rtol=0, atol=1e-6 * np.abs(want).max(), err_msg=n)


def test_export_merge_and_adapter_flags_from_the_command_line(tmp_path):
    base = base_folder(tmp_path)
    model = our_adapter(base, EVERY)
    lora.save_checkpoint(tmp_path / "ck.h5", model, AdamW(model), {"step": 1})
    r = run_cli("export", tmp_path / "ck.h5", tmp_path / "merged", "--merge")
    assert r.returncode == 0, r.stderr
    ids = token_ids()
    assert rel_err(GPT.from_pretrained(tmp_path / "merged").logits(ids), model.logits(ids)) <= 1e-6
    r = run_cli("export", tmp_path / "ck.h5", tmp_path / "ad")
    assert r.returncode == 0 and "trainable params:" in r.stdout, r.stderr
    back = GPT.from_pretrained(base)
    lora.load_adapter(back, tmp_path / "ad")
    assert rel_err(back.logits(ids), model.logits(ids)) <= 1e-6

    r = run_cli("export", tmp_path / "ad", tmp_path / "bad", "--merge", "--weights", tmp_path / "nowhere")
    assert r.returncode == 2 and "nowhere" in r.stderr and not (tmp_path / "bad").exists()
    r = run_cli("export", tmp_path / "ck.h5", tmp_path / "bad", "--merge", "--weights",
                base_folder(tmp_path / "other", tie=True))
    assert r.returncode == 2 and "trained on other base weights" in r.stderr and not (tmp_path / "bad").exists()
