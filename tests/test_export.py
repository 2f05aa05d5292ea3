"""Export to a Hugging Face GPT-2 folder: read back bit-exact by our loader, the exact config.json
and tensor names GPT2LMHeadModel expects, the `minisft export` command, and (where transformers is
installed) GPT2LMHeadModel's logits matching ours."""
import json
from pathlib import Path

import numpy as np
import pytest

from minisft import GPT, GPTConfig
from minisft import safetensors as st
from minisft.checkpoint import save_checkpoint
from minisft.errors import MinisftError
from tests.helpers import EXPORT_CFG as CFG, random_model, run_cli, token_ids

ROOT = Path(__file__).resolve().parents[1]
@pytest.mark.parametrize("tied", [False, True])
def test_export_reads_back_bit_exact(tmp_path, tied):
    model = random_model(tie_embeddings=tied, drop_rate=0.1)
    model.save_pretrained(tmp_path / "hf")
    back = GPT.from_pretrained(tmp_path / "hf")
    assert back.cfg == GPTConfig(**{**model.cfg.to_dict(), "drop_rate": 0.0})  # dropout is not a weight
    assert list(back.params) == list(model.params)
    for n, a in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[n], a, err_msg=n)
    np.testing.assert_array_equal(back.logits(token_ids()), model.logits(token_ids()))


def test_config_and_tensor_names_are_gpt2lmheadmodels(tmp_path):
    model = random_model(drop_rate=0.1)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 97, "n_positions": 32,
        "n_ctx": 32, "n_embd": 16, "n_layer": 2, "n_head": 4, "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "embd_pdrop": 0.1, "resid_pdrop": 0.1,
        "attn_pdrop": 0.0, "tie_word_embeddings": False}
    tensors, _, meta = st.read_header(tmp_path / "model.safetensors")
    assert meta == {"format": "pt"}  # transformers refuses safetensors without it
    # As GPT2LMHeadModel.save_pretrained writes them: the body under `transformer.`, the head not.
    assert set(tensors) == {"transformer." + n for n in model.params if n != "lm_head.weight"} | {"lm_head.weight"}
    assert all(dtype == "F32" for dtype, *_ in tensors.values())


def test_model_without_qkv_bias_exports_zero_biases(tmp_path):
    model = random_model(qkv_bias=False)
    model.save_pretrained(tmp_path)
    tensors, _ = st.load(tmp_path / "model.safetensors")
    for i in range(CFG.n_layers):
        np.testing.assert_array_equal(tensors[f"transformer.h.{i}.attn.c_attn.bias"], np.zeros(48, np.float32))
    back = GPT.from_pretrained(tmp_path)
    assert back.cfg.qkv_bias  # GPT-2's format always has the bias; zero computes the same
    np.testing.assert_array_equal(back.logits(token_ids()), model.logits(token_ids()))
    # With the model's own config, the file's zero biases are refused as unexpected (the shape comes
    # from model=, and a model without qkv bias has no place for them).
    with pytest.raises(MinisftError, match=r"unexpected h\.0\.attn\.c_attn\.bias, h\.1\.attn\.c_attn\.bias"):
        GPT.from_pretrained(tmp_path / "model.safetensors", model=model.cfg)


def test_float64_model_exports_rounded_to_float32(tmp_path):
    model = random_model(dtype="float64")
    model.params["wte.weight"] += 1e-12  # below float32's resolution: the export rounds it away
    model.save_pretrained(tmp_path)
    back = GPT.from_pretrained(tmp_path)
    for n, a in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[n], a.astype(np.float32), err_msg=n)


def test_export_overwrites_atomically_and_keeps_other_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    random_model(seed=1).save_pretrained(tmp_path)
    second = random_model(seed=2)
    second.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    np.testing.assert_array_equal(GPT.from_pretrained(tmp_path).logits(token_ids()), second.logits(token_ids()))


def test_export_command(tmp_path):
    model = random_model(dtype="float64", tie_embeddings=True)
    save_checkpoint(tmp_path / "ck.h5", model, train_state={"step": 1})
    r = run_cli("export", tmp_path / "ck.h5", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert f"exported {tmp_path / 'ck.h5'} -> {tmp_path / 'out'}" in r.stdout and "tied to wte" in r.stdout
    back = GPT.from_pretrained(tmp_path / "out")
    assert back.cfg.tie_embeddings and "lm_head.weight" not in back.params
    for n, a in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[n], a.astype(np.float32), err_msg=n)

    (tmp_path / "bad.h5").write_bytes(b"not hdf5 at all")
    r = run_cli("export", tmp_path / "bad.h5", tmp_path / "out2")
    assert r.returncode == 2
    assert r.stderr.startswith(f"minisft: error: {tmp_path / 'bad.h5'}: cannot be read as an HDF5 checkpoint")
    assert "Traceback" not in r.stderr and not (tmp_path / "out2").exists()


@pytest.mark.parametrize("tied,qkv_bias", [(False, True), (True, True), (False, False)])
def test_gpt2lmheadmodel_loads_the_export_with_matching_logits(tmp_path, tied, qkv_bias):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed: "
                                       "`pip install transformers` to check the export against GPT2LMHeadModel")
    torch = pytest.importorskip("torch", reason="torch is not installed")
    model = random_model(tie_embeddings=tied, qkv_bias=qkv_bias, seed=4, scale=10.0)  # logits of order 10
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    if not qkv_bias:
        assert not hf.transformer.h[1].attn.c_attn.bias.any()
    for n, a in model.state_dict().items():  # every weight arrived where it belongs
        hf_name = n if n == "lm_head.weight" else "transformer." + n
        np.testing.assert_array_equal(hf.state_dict()[hf_name].numpy(), a, err_msg=n)
    ids = token_ids()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids)).logits.numpy()  # (B, T, V)
    ours = model.logits(ids)
    # float32 both sides, different summation orders: agreement to float32 rounding of the logits.
    scale = np.abs(ours).max()
    assert scale > 1.0
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=2e-6 * scale)
