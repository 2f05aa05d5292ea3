"""Llama-family weights in and out of Hugging Face folders: our export loads in transformers with equal
logits and reads back bit-exact; hub presets download (single file and sharded, bfloat16 on disk,
resuming a cut download) from a loopback server laid out as huggingface.co and equal transformers'
model; gated repositories explain themselves; every malformed folder is refused in one line naming
the file and the tensor or field; a sharded bfloat16 model loads with about one float32 copy at peak.

Folders for the refusal tests are written by tests/hf_files.py's own safetensors writer, so the reader
is tested against files it did not write; the rest are written by transformers itself."""
import json
from dataclasses import replace

import numpy as np
import pytest

from minisft import GPT, llama
from minisft.errors import MinisftError
from minisft.llama import LlamaConfig, RopeScaling
from minisft.pretrained import (LLAMA_FILES, LLAMA_HUB, fetch_preset, read_generation_config, read_pretrained,
                                save_pretrained)
from tests.file_server import FileServer
from tests.hf_files import to_bf16_bits, write_safetensors
from tests.helpers import rel_err

SMALL = dict(vocab_size=96, context_length=64, emb_dim=48, n_layers=2, n_heads=6, ffn_dim=80)
TINY = {
    "llama": LlamaConfig(**SMALL, n_kv_heads=2, head_dim=8, rope_theta=500.0,
                         rope_scaling=RopeScaling(4.0, 1.0, 4.0, 32), tie_embeddings=False),
    "qwen2": LlamaConfig(**SMALL, n_kv_heads=2, head_dim=8, rms_eps=1e-6, rope_theta=1e6, qkv_bias=True,
                         arch="qwen2"),
    "qwen3": LlamaConfig(**SMALL, n_kv_heads=3, head_dim=12, rms_eps=1e-6, qk_norm=True, tie_embeddings=False,
                         arch="qwen3"),
}
HF_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@pytest.fixture
def server(tmp_path):
    s = FileServer(tmp_path / "srv")
    yield s
    s.close()


def random_params(cfg, seed=0) -> dict:
    """Every minisft tensor random (norm weights around 1, biases and weights around 0): no zeros and
    no ones, so a misplaced piece shows in the logits."""
    rng = np.random.default_rng(seed)
    return {n: ((1.0 if n.endswith("norm.weight") else 0.0) + rng.normal(0, 0.1 if "norm" not in n else 0.3, s))
            .astype(np.float32) for n, s in llama.param_shapes(cfg).items()}


def hf_tensors(cfg, params) -> dict:
    """minisft tensors -> {Hugging Face name: array}, as a Hugging Face file holds them."""
    return {hf: llama.hf_array(piece, params[piece.ours]) for hf, piece in llama.hf_layout(cfg).items()}


def as_stored(a, code):
    """What a reader gets back from float32 a written in dtype code, widened to float32."""
    if code == "BF16":
        return (to_bf16_bits(a).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(a, np.float16).astype(np.float32) if code == "F16" else a


def write_folder(folder, cfg, tensors: dict, code="F32", shards=1, config=None):
    """An HF folder of {HF name: array}: config.json (llama.hf_config), and model.safetensors or, with
    shards > 1, model-0000k-of-0000n.safetensors and the index naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or llama.hf_config(cfg)))
    names = list(tensors)
    if shards == 1:
        write_safetensors(folder / "model.safetensors", {n: (code, tensors[n]) for n in names}, {"format": "pt"})
        return folder
    wmap = {}
    for k, part in enumerate(np.array_split(np.array(names), shards)):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / fname, {n: (code, tensors[n]) for n in part}, {"format": "pt"})
        wmap.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return folder


def ids_for(cfg, seed=3):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=(2, 9))  # (B, T)


# ---- our export, loaded by transformers ----------------------------------------------------------------
@pytest.mark.parametrize("arch", list(TINY))
def test_export_loads_in_transformers_with_equal_logits_and_reads_back_bit_exact(tmp_path, arch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = TINY[arch]
    ours = GPT(cfg, params=random_params(cfg))
    save_pretrained(ours, tmp_path / "hf")

    m, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                                output_loading_info=True)
    assert type(m).__name__ == HF_CLASS[arch]
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    ids = ids_for(cfg)
    with torch.no_grad():
        hf_logits = m(input_ids=torch.tensor(ids)).logits.numpy()
    assert rel_err(ours.logits(ids), hf_logits) <= 1e-5

    again, sd = read_pretrained(tmp_path / "hf")
    assert again == cfg
    assert list(sd) == list(ours.params)
    for n, a in ours.state_dict().items():
        np.testing.assert_array_equal(sd[n], a, err_msg=n)


# ---- hub presets through the download path -------------------------------------------------------------
def hub_model(transformers, torch, cfg, seed=0):
    """A transformers model of shape cfg, its norms and biases moved off their 1 / 0 start."""
    conf = transformers.AutoConfig.for_model(**{**llama.hf_config(cfg), "eos_token_id": [5, 7], "bos_token_id": 1})
    torch.manual_seed(seed)
    m = transformers.AutoModelForCausalLM.from_config(conf)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return m


@pytest.mark.parametrize("preset,arch,sharded", [("qwen2.5-0.5b-instruct", "qwen2", False),
                                                 ("smollm2-135m", "llama", True)])
def test_hub_preset_downloads_resumes_and_equals_transformers(tmp_path, server, monkeypatch, preset, arch, sharded):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setitem(LLAMA_HUB, preset, LLAMA_HUB[preset]._replace(sharded=sharded))
    repo = server.root / LLAMA_HUB[preset].repo / "resolve" / "main"
    hub_model(transformers, torch, TINY[arch]).to(torch.bfloat16).save_pretrained(
        repo, max_shard_size="20KB" if sharded else "1GB")
    for fname in ("tokenizer.json", "tokenizer_config.json"):  # only copied: their content is not read here
        (repo / fname).write_text(json.dumps({"file": fname}))
    weights = (sorted(p.name for p in repo.glob("model-*.safetensors")) if sharded else ["model.safetensors"])
    assert len(weights) > 1 or not sharded
    first = f"/{LLAMA_HUB[preset].repo}/resolve/main/{weights[0]}"
    server.script = ["ok"] * (len(LLAMA_FILES) + sharded) + [("truncate", 3000)]  # the first weights file is cut

    cache = tmp_path / "cache"
    ours = GPT.from_pretrained(preset, cache_dir=cache, base_url=server.url)

    paths = [p for p, _ in server.requests]
    expect = [*LLAMA_FILES, *(["model.safetensors.index.json"] if sharded else []), weights[0], weights[0],
              *weights[1:]]
    assert paths == [f"/{LLAMA_HUB[preset].repo}/resolve/main/{f}" for f in expect]
    assert server.requests[len(LLAMA_FILES) + sharded + 1] == (first, "bytes=3000-")  # resumed, not restarted
    assert all(r.get("Authorization") is None for r in server.requests)  # no HF_TOKEN: no token sent
    folder = cache / "models" / preset
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in repo.iterdir())
    assert read_generation_config(folder) == [5, 7]

    m = transformers.AutoModelForCausalLM.from_pretrained(repo, dtype=torch.float32)  # bf16 widened, as ours
    assert ours.cfg == TINY[arch]  # the shape of the folder's config.json, not of the named preset
    ids = ids_for(ours.cfg)
    with torch.no_grad():
        hf_logits = m(input_ids=torch.tensor(ids)).logits.numpy()
    assert rel_err(ours.logits(ids), hf_logits) <= 1e-5
    GPT.from_pretrained(preset, cache_dir=cache, base_url=server.url)
    assert len(server.requests) == len(expect)  # the second load reads the cache only


def test_gated_repository_asks_for_the_licence_and_sends_hf_token(tmp_path, server, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    for preset in ("llama-3.2-1b", "llama-3.2-1b-instruct"):  # the server scripts answers only for files it has
        repo = server.root / LLAMA_HUB[preset].repo / "resolve" / "main"
        repo.mkdir(parents=True)
        (repo / "config.json").write_text(json.dumps(llama.hf_config(TINY["llama"])))
    server.script = [401]
    with pytest.raises(MinisftError, match=r"config\.json: HTTP 401: meta-llama/Llama-3\.2-1B is gated; accept "
                                           r"its licence at https://huggingface\.co/meta-llama/Llama-3\.2-1B "
                                           r"and set HF_TOKEN to an access token of that account$"):
        fetch_preset("llama-3.2-1b", tmp_path / "cache", server.url)
    assert server.requests[-1].get("Authorization") is None

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    server.script = [403]
    with pytest.raises(MinisftError, match=r"HTTP 403: .*HF_TOKEN is set, but its account has no access") as e:
        fetch_preset("llama-3.2-1b-instruct", tmp_path / "cache", server.url)
    assert "hf_secret" not in str(e.value)
    assert server.requests[-1].get("Authorization") == "Bearer hf_secret"
    with pytest.raises(MinisftError, match=r"generation_config\.json: HTTP 404 Not Found$"):  # others stay as they are
        fetch_preset("llama-3.2-1b-instruct", tmp_path / "cache", server.url)


# ---- local folders ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("code,shards", [("F32", 1), ("F16", 3), ("BF16", 1), ("BF16", 4)])
def test_folder_in_any_dtype_and_sharding_loads_exactly(tmp_path, code, shards):
    cfg = TINY["qwen2"]
    params = random_params(cfg, seed=1)
    folder = write_folder(tmp_path / "m", cfg, hf_tensors(cfg, params), code=code, shards=shards)
    got_cfg, sd = read_pretrained(folder)
    assert got_cfg == cfg
    expect = llama.from_hf({n: as_stored(a, code) for n, a in hf_tensors(cfg, params).items()}, cfg)
    assert list(sd) == list(llama.param_shapes(cfg))
    for n, a in expect.items():
        assert sd[n].dtype == np.float32
        np.testing.assert_array_equal(sd[n], a, err_msg=n)


def test_tied_head_in_the_file_is_accepted_only_as_a_copy_of_embed_tokens(tmp_path):
    cfg = TINY["qwen2"]
    tensors = hf_tensors(cfg, random_params(cfg))
    write_folder(tmp_path / "m", cfg, {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}, shards=2)
    assert "lm_head.weight" not in read_pretrained(tmp_path / "m")[1]
    write_folder(tmp_path / "m", cfg, {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] * 2}, shards=2)
    with pytest.raises(MinisftError, match=r"model-0000\d-of-00002\.safetensors: the model ties the head to "
                                           r"embed_tokens but lm_head\.weight differs"):
        read_pretrained(tmp_path / "m")


def test_requested_model_and_bare_file(tmp_path):
    cfg = TINY["qwen2"]
    params = random_params(cfg)
    folder = write_folder(tmp_path / "m", cfg, hf_tensors(cfg, params))
    # An untied model asked of a tied folder starts its head as a copy of embed_tokens.
    untied = replace(cfg, tie_embeddings=False)
    got_cfg, sd = read_pretrained(folder, model=untied)
    assert got_cfg == untied
    np.testing.assert_array_equal(sd["lm_head.weight"], params["embed_tokens.weight"])
    assert not np.shares_memory(sd["lm_head.weight"], sd["embed_tokens.weight"])
    # A bare file takes its shape from the model given.
    _, sd = read_pretrained(folder / "model.safetensors", model=cfg)
    np.testing.assert_array_equal(sd["layers.1.self_attn.qkv_proj.bias"], params["layers.1.self_attn.qkv_proj.bias"])
    with pytest.raises(MinisftError, match=r"config\.json does not describe the requested model: vocab_size 96 vs "
                                           r"151936, context_length 64 vs 32768, emb_dim 48 vs 896"):
        read_pretrained(folder, model="qwen2.5-0.5b-instruct")
    with pytest.raises(MinisftError, match=r"config\.json describes a qwen2 \(Llama family\); the requested model "
                                           r"is a GPT-2"):
        read_pretrained(folder, model="gpt2-small")
    with pytest.raises(MinisftError, match="unknown model preset 'qwen9'; choose one of gpt2-small.*smollm2-135m"):
        read_pretrained(folder, model="qwen9")


def _config(**changes):
    def edit(folder, cfg):
        hf = {**llama.hf_config(cfg), **changes}
        (folder / "config.json").write_text(json.dumps({k: v for k, v in hf.items() if v is not None}))
    return edit


def _tensors(fn, shards=1):
    def edit(folder, cfg):
        tensors = hf_tensors(cfg, random_params(cfg))
        fn(tensors)
        write_folder(folder, cfg, tensors, shards=shards)
    return edit


def _index(fn):
    def edit(folder, cfg):
        write_folder(folder, cfg, hf_tensors(cfg, random_params(cfg)), shards=2)
        path = folder / "model.safetensors.index.json"
        path.write_text(fn(path.read_text()))
    return edit


def _nan(tensors):
    tensors["model.layers.1.self_attn.q_norm.weight"][2] = np.nan


def _no_second_shard(folder, cfg):
    write_folder(folder, cfg, hf_tensors(cfg, random_params(cfg)), shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()


def _repeat_in_index(text):  # the same tensor listed twice, for both shards
    return text.replace('"model.norm.weight": "model-00002-of-00002.safetensors"',
                        '"model.norm.weight": "model-00001-of-00002.safetensors", '
                        '"model.norm.weight": "model-00002-of-00002.safetensors"')


# (how to break a Qwen3 folder (untied), the file the message names, words it contains)
BROKEN = {
    "unknown architecture": (_config(model_type="mistral", architectures=["MistralForCausalLM"]), "config.json",
                             ["model_type is 'mistral'", "['MistralForCausalLM']", "'llama', 'qwen2', 'qwen3'"]),
    "architecture the model type lacks": (_config(architectures=["Qwen3MoeForCausalLM"]), "config.json",
                                          ["architectures ['Qwen3MoeForCausalLM']"]),
    "activation the kernels lack": (_config(hidden_act="gelu"), "config.json", ["hidden_act is 'gelu'"]),
    "config field missing": (_config(num_hidden_layers=None), "config.json", ["num_hidden_layers must be"]),
    "rope scaling field missing": (_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "config.json",
                                   ["rope_scaling lacks the field low_freq_factor"]),
    "config not JSON": (lambda f, c: (f / "config.json").write_text("{oops"), "config.json", ["cannot read"]),
    "wrong shape": (_tensors(lambda t: t.update({"model.layers.1.self_attn.k_proj.weight":
                                                 t["model.layers.1.self_attn.k_proj.weight"].T})),
                    "model.safetensors", ["'model.layers.1.self_attn.k_proj.weight' has shape (48, 36)",
                                          "needs (36, 48)"]),
    "missing tensor": (_tensors(lambda t: t.pop("model.norm.weight")), "model.safetensors",
                       ["missing model.norm.weight"]),
    "unknown tensor": (_tensors(lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(6)})),
                       "model.safetensors", ["unexpected model.layers.0.self_attn.rotary_emb.inv_freq"]),
    "non-finite": (_tensors(_nan, shards=2), "model-00002-of-00002.safetensors",
                   ["'model.layers.1.self_attn.q_norm.weight' holds 1 non-finite"]),
    "untied config without lm_head": (_tensors(lambda t: t.pop("lm_head.weight")), "model.safetensors",
                                      ["tie_word_embeddings is not true", "lm_head.weight is missing"]),
    "no weights": (lambda f, c: (f / "model.safetensors").unlink(), "", ["holds neither model.safetensors nor"]),
    "shard missing": (_no_second_shard, "model.safetensors.index.json",
                      ["names shards that are not in the folder: model-00002-of-00002.safetensors"]),
    "tensor twice in the index": (_index(_repeat_in_index), "model.safetensors.index.json",
                                  ["'model.norm.weight' appears twice"]),
    "index names an unknown tensor": (_index(lambda s: s.replace('{"model.', '{"model.extra.weight": '
                                                                 '"model-00001-of-00002.safetensors", "model.', 1)),
                                      "model-00001-of-00002.safetensors",
                                      ["in the shard only none; in the index only model.extra.weight"]),
    "shard holds a tensor the index lacks": (_index(lambda s: s.replace('"model.norm.weight": '
                                                                        '"model-00002-of-00002.safetensors", ', '')),
                                             "model-00002-of-00002.safetensors",
                                             ["in the shard only model.norm.weight; in the index only none"]),
    "shard outside the folder": (_index(lambda s: s.replace('"model-00002-of-00002', '"../model-00002-of-00002')),
                                 "model.safetensors.index.json", ["'../model-00002-of-00002.safetensors', which is "
                                                                  "not a .safetensors file name beside the index"]),
    "index without weight_map": (_index(lambda s: '{"metadata": {}}'), "model.safetensors.index.json",
                                 ["no weight_map object"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_folders_are_refused_naming_the_file(tmp_path, case):
    cfg = TINY["qwen3"]
    breaker, fname, words = BROKEN[case]
    folder = write_folder(tmp_path / "m", cfg, hf_tensors(cfg, random_params(cfg)))
    if "shard" in case or "index" in case:
        (folder / "model.safetensors").unlink()
    breaker(folder, cfg)
    with pytest.raises(MinisftError) as e:
        read_pretrained(folder)
    msg = str(e.value)
    assert "\n" not in msg and str(folder / fname) in msg
    for w in words:
        assert w in msg, msg


def test_a_sharded_bfloat16_model_loads_with_about_one_float32_copy_at_peak(tmp_path):
    """The shards are read one at a time and widened tensor by tensor into the fused float32 tensors:
    the load's extra memory beyond the model it returns is about one tensor, not a second model."""
    import tracemalloc
    cfg = LlamaConfig(vocab_size=256, context_length=64, emb_dim=64, n_layers=12, n_heads=4, n_kv_heads=2,
                      head_dim=16, ffn_dim=256)
    folder = write_folder(tmp_path / "m", cfg, hf_tensors(cfg, random_params(cfg)), code="BF16", shards=4)
    total = sum(int(np.prod(s)) * 4 for s in llama.param_shapes(cfg).values())
    largest = max(int(np.prod(s)) * 4 for s in llama.param_shapes(cfg).values())
    assert largest < total / 10
    tracemalloc.start()
    _, sd = read_pretrained(folder)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1.25 * total, (peak, total, largest)  # every shard widened at once would be 2 * total


# ---- generation config -------------------------------------------------------------------------------
def test_generation_config_gives_the_end_of_sequence_ids(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert read_generation_config(tmp_path) == [2]  # no generation_config.json: config.json's
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    assert read_generation_config(tmp_path) == [151645, 151643]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    assert read_generation_config(tmp_path) == [0]
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True}))
    assert read_generation_config(tmp_path) == [2]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert read_generation_config(tmp_path) == []
    for bad, says in (('{"eos_token_id": "2"}', "eos_token_id must be a token id"),
                      ('{"eos_token_id": [1, true]}', "eos_token_id must be a token id"),
                      ("[2]", "must be a JSON object"), ("{oops", "cannot read the generation config")):
        (tmp_path / "generation_config.json").write_text(bad)
        with pytest.raises(MinisftError, match=says) as e:
            read_generation_config(tmp_path)
        assert str(tmp_path / "generation_config.json") in str(e.value)
