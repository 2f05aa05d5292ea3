"""GPT.from_pretrained: GPT-2-format files written here from random weights, served from a loopback
HTTP server and loaded through the real download path; resumable downloads; every malformed file
refused with a message naming the file and the tensor or field."""
import json
from dataclasses import replace

import numpy as np
import pytest

from minisft import GPT, GPTConfig
from minisft.errors import MinisftError
from minisft.download import download_file
from minisft.pretrained import HF_REPOS
from tests.file_server import FileServer
from tests.hf_files import gpt2_state, hf_config_like_openai, to_bf16_bits, write_gpt2_folder, write_safetensors

TINY = GPTConfig(vocab_size=97, context_length=32, emb_dim=16, n_layers=2, n_heads=4)
TINY_TIED = replace(TINY, tie_embeddings=True)


@pytest.fixture
def server(tmp_path):
    s = FileServer(tmp_path / "srv")
    yield s
    s.close()


def repo(server, preset):
    """Where the server keeps a preset's files: /{HF repo}/resolve/main/..., as huggingface.co."""
    return server.root / HF_REPOS[preset] / "resolve" / "main"


def token_ids(cfg, seed=5, shape=(2, 9)):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=shape)  # (B, T)


def as_stored(sd, code):
    """What a reader must get back from sd written in dtype code, widened to float32."""
    if code == "F16":
        return {n: a.astype(np.float16).astype(np.float32) for n, a in sd.items()}
    if code == "BF16":
        return {n: (to_bf16_bits(a).astype(np.uint32) << 16).view(np.float32) for n, a in sd.items()}
    return sd


def assert_model_holds(model, sd):
    got = model.state_dict()
    assert list(got) == list(sd)
    for n, a in sd.items():
        assert got[n].dtype == np.float32
        np.testing.assert_array_equal(got[n], a, err_msg=n)


# ---- through the download path -------------------------------------------------------------------
@pytest.mark.parametrize("prefix,mask_buffers,code", [(True, True, "F32"), (False, True, "F32"),
                                                      (True, False, "F16"), (False, False, "BF16")])
def test_preset_downloads_and_loads_exactly(tmp_path, server, prefix, mask_buffers, code):
    sd = gpt2_state(TINY_TIED, seed=1)  # an OpenAI file: tied, so no lm_head.weight in it
    write_gpt2_folder(repo(server, "gpt2-medium"), TINY, sd, prefix=prefix, mask_buffers=mask_buffers, code=code)
    cache = tmp_path / "cache"

    model = GPT.from_pretrained("gpt2-medium", cache_dir=cache, base_url=server.url)

    assert [p for p, _ in server.requests] == [f"/openai-community/gpt2-medium/resolve/main/{f}"
                                               for f in ("config.json", "model.safetensors")]
    assert model.cfg == TINY  # untied (the book's model), no dropout
    expect = as_stored(sd, code)
    expect["lm_head.weight"] = expect["wte.weight"]  # the untied head starts as a copy of wte
    assert_model_holds(model, expect)
    assert not np.shares_memory(model.params["lm_head.weight"], model.params["wte.weight"])
    direct = GPT(TINY, params=expect)
    np.testing.assert_array_equal(model.logits(token_ids(TINY)), direct.logits(token_ids(TINY)))
    assert sorted(p.name for p in (cache / "models" / "gpt2-medium").iterdir()) == ["config.json",
                                                                                    "model.safetensors"]
    # A second load reads the cache and asks the server nothing.
    again = GPT.from_pretrained("gpt2-medium", cache_dir=cache, base_url=server.url)
    assert len(server.requests) == 2
    assert_model_holds(again, expect)


def test_environment_variables_set_source_and_cache(tmp_path, server, monkeypatch):
    sd = gpt2_state(TINY_TIED, seed=2)
    write_gpt2_folder(repo(server, "gpt2-small"), TINY, sd)
    monkeypatch.setenv("MINISFT_HF_BASE_URL", server.url)
    monkeypatch.setenv("MINISFT_CACHE_DIR", str(tmp_path / "envcache"))
    model = GPT.from_pretrained("gpt2-small", dtype="float64")
    assert server.requests[0][0] == "/openai-community/gpt2/resolve/main/config.json"
    assert (tmp_path / "envcache" / "models" / "gpt2-small" / "model.safetensors").is_file()
    assert model.dtype == "float64" and model.params["wte.weight"].dtype == np.float64
    np.testing.assert_array_equal(model.state_dict()["h.1.mlp.c_fc.weight"], sd["h.1.mlp.c_fc.weight"])


def test_gpt2_small_shapes_through_the_download_path(tmp_path, server):
    """The real size once: 124M parameters (500 MB), laid out as openai-community/gpt2 is (no
    prefix, mask buffers of 1024 x 1024), downloaded, loaded, and logits identical to a model built
    from the same arrays."""
    cfg = GPTConfig.preset("gpt2-small")
    sd = gpt2_state(replace(cfg, tie_embeddings=True), seed=3)
    write_gpt2_folder(repo(server, "gpt2-small"), cfg, sd, prefix=False, mask_buffers=True)
    model = GPT.from_pretrained("gpt2-small", cache_dir=tmp_path / "cache", base_url=server.url)
    assert model.cfg == cfg and model.num_params() == 124_439_808 + 50257 * 768  # + the untied head
    ids = token_ids(cfg, shape=(1, 6))
    logits = model.logits(ids)
    model.load_state_dict({**sd, "lm_head.weight": sd["wte.weight"]})  # the same arrays, loaded directly
    np.testing.assert_array_equal(logits, model.logits(ids))


def test_corrupt_download_is_refused_naming_the_cached_file(tmp_path, server):
    folder = write_gpt2_folder(repo(server, "gpt2-small"), TINY, gpt2_state(TINY_TIED))
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])  # the served file itself is cut short
    with pytest.raises(MinisftError) as e:
        GPT.from_pretrained("gpt2-small", cache_dir=tmp_path / "cache", base_url=server.url)
    assert str(tmp_path / "cache" / "models" / "gpt2-small" / "model.safetensors") in str(e.value)
    assert "truncated" in str(e.value)


def test_a_download_that_does_not_load_is_not_kept_in_the_cache(tmp_path, server):
    folder = write_gpt2_folder(repo(server, "gpt2-small"), TINY, gpt2_state(TINY_TIED))
    good = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(b"<html>rate limited</html>")  # the server serves junk once
    with pytest.raises(MinisftError, match="removed from the cache"):
        GPT.from_pretrained("gpt2-small", cache_dir=tmp_path / "cache", base_url=server.url, model=TINY)
    assert not (tmp_path / "cache" / "models" / "gpt2-small" / "model.safetensors").exists()
    (folder / "model.safetensors").write_bytes(good)  # ... then the real file
    assert GPT.from_pretrained("gpt2-small", cache_dir=tmp_path / "cache", base_url=server.url,
                               model=TINY).cfg.emb_dim == TINY.emb_dim


# ---- the resumable downloader --------------------------------------------------------------------
@pytest.fixture
def blob(server):
    data = np.random.default_rng(7).bytes(1_000_003)
    (server.root / "files").mkdir(parents=True)
    (server.root / "files" / "blob.bin").write_bytes(data)
    return data, f"{server.url}/files/blob.bin"


def test_dropped_connection_resumes_with_a_range_request(tmp_path, server, blob):
    data, url = blob
    server.script = [("truncate", 300_000)]
    dest = download_file(url, tmp_path / "d" / "blob.bin")
    assert dest.read_bytes() == data
    assert server.requests == [("/files/blob.bin", None), ("/files/blob.bin", "bytes=300000-")]
    assert [p.name for p in dest.parent.iterdir()] == ["blob.bin"]


def test_part_left_by_an_earlier_run_is_resumed(tmp_path, server, blob):
    data, url = blob
    (tmp_path / "blob.bin.part").write_bytes(data[:12345])
    download_file(url, tmp_path / "blob.bin")
    assert (tmp_path / "blob.bin").read_bytes() == data
    assert server.requests == [("/files/blob.bin", "bytes=12345-")]
    assert not (tmp_path / "blob.bin.part").exists()


def test_every_attempt_that_makes_progress_continues(tmp_path, server, blob):
    data, url = blob
    server.script = [("truncate", 100_000)] * 5
    download_file(url, tmp_path / "blob.bin", retries=1)  # 5 drops in a row, but each one adds bytes
    assert (tmp_path / "blob.bin").read_bytes() == data
    assert [r for _, r in server.requests] == [None] + [f"bytes={k * 100_000}-" for k in range(1, 6)]


def test_server_ignoring_range_restarts_from_zero(tmp_path, server, blob):
    data, url = blob
    server.script = ["ignore-range"]
    (tmp_path / "blob.bin.part").write_bytes(b"x" * 5000)  # would corrupt the file if appended to
    download_file(url, tmp_path / "blob.bin")
    assert (tmp_path / "blob.bin").read_bytes() == data


def test_part_longer_than_the_file_restarts(tmp_path, server, blob):
    data, url = blob
    (tmp_path / "blob.bin.part").write_bytes(b"x" * (len(data) + 10))  # the server answers 416
    download_file(url, tmp_path / "blob.bin")
    assert (tmp_path / "blob.bin").read_bytes() == data
    assert [r for _, r in server.requests] == [f"bytes={len(data) + 10}-", None]


def test_stalled_download_gives_up_keeping_the_part(tmp_path, server, blob):
    data, url = blob
    (tmp_path / "blob.bin.part").write_bytes(data[:5000])
    server.script = [("truncate", 0)] * 2  # two attempts in a row that add nothing
    with pytest.raises(MinisftError, match=r"5000 bytes are kept in .*blob\.bin\.part.*resumes"):
        download_file(url, tmp_path / "blob.bin", retries=1)
    assert not (tmp_path / "blob.bin").exists()
    download_file(url, tmp_path / "blob.bin")  # the next run picks up from byte 5000
    assert (tmp_path / "blob.bin").read_bytes() == data
    assert server.requests[-1] == ("/files/blob.bin", "bytes=5000-")


def test_http_errors_and_wrong_sizes_leave_nothing(tmp_path, server, blob):
    data, url = blob
    out = tmp_path / "out"
    with pytest.raises(MinisftError, match=r"/files/missing\.bin: HTTP 404"):
        download_file(f"{server.url}/files/missing.bin", out / "missing.bin")
    with pytest.raises(MinisftError, match=f"downloaded {len(data)} bytes, expected 999"):
        download_file(url, out / "blob.bin", expected_size=999)
    assert list(out.iterdir()) == []


def test_unreachable_server_is_a_clear_error(tmp_path):
    s = FileServer(tmp_path)
    url = f"{s.url}/x.bin"
    s.close()  # nothing listens on that port any more
    with pytest.raises(MinisftError, match=r"x\.bin: download failed \(.*Connection refused"):
        download_file(url, tmp_path / "x.bin", retries=0)
    assert list(tmp_path.iterdir()) == []


# ---- local files ---------------------------------------------------------------------------------
def test_local_folder_and_single_file(tmp_path):
    sd = gpt2_state(TINY, seed=4)  # untied, with its own lm_head.weight (as our export writes)
    folder = write_gpt2_folder(tmp_path / "m", TINY, sd, prefix=False, mask_buffers=False,
                               config={**hf_config_like_openai(TINY), "tie_word_embeddings": False})
    assert_model_holds(GPT.from_pretrained(folder), sd)  # the file's head, not a copy of wte
    single = GPT.from_pretrained(folder / "model.safetensors", model=TINY)
    assert_model_holds(single, sd)
    np.testing.assert_array_equal(single.logits(token_ids(TINY)), GPT(TINY, params=sd).logits(token_ids(TINY)))

    with pytest.raises(MinisftError, match=r"model\.safetensors: a bare \.safetensors file carries no shape"):
        GPT.from_pretrained(folder / "model.safetensors")
    with pytest.raises(MinisftError, match=r"tensor 'wte\.weight' has shape \(97, 16\).*needs \(50257, 64\)"):
        GPT.from_pretrained(folder / "model.safetensors", model="gpt2-tiny")  # 2 layers too, other widths
    with pytest.raises(MinisftError,
                       match=r"a GPT-2 with 12 layers.*tensor names do not match the model: "
                             r"missing h\.2\.ln_1\.weight"):
        GPT.from_pretrained(folder / "model.safetensors", model="gpt2-small")
    with pytest.raises(MinisftError, match=r"config\.json does not describe the requested model: vocab_size "
                                           r"97 vs 50257, context_length 32 vs 1024, emb_dim 16 vs 768"):
        GPT.from_pretrained(folder, model="gpt2-small")
    with pytest.raises(MinisftError, match="unknown model preset 'gpt2-huge'"):
        GPT.from_pretrained(folder, model="gpt2-huge")
    with pytest.raises(MinisftError, match="not a preset .*gpt2-small.* and no such file or folder"):
        GPT.from_pretrained(tmp_path / "nowhere")
    (folder / "config.json").unlink()
    with pytest.raises(MinisftError, match="not a model folder: config.json is missing"):
        GPT.from_pretrained(folder)


def test_tied_config_loads_a_tied_model(tmp_path):
    sd = gpt2_state(TINY_TIED, seed=6)
    cfg_json = {**hf_config_like_openai(TINY), "tie_word_embeddings": True}
    folder = write_gpt2_folder(tmp_path / "m", TINY, sd, config=cfg_json)
    model = GPT.from_pretrained(folder)
    assert model.cfg == TINY_TIED and "lm_head.weight" not in model.params
    assert_model_holds(model, sd)
    # A tied file may carry lm_head.weight only as an exact copy of wte.
    write_gpt2_folder(folder, TINY, {**sd, "lm_head.weight": sd["wte.weight"]}, config=cfg_json)
    assert_model_holds(GPT.from_pretrained(folder), sd)
    write_gpt2_folder(folder, TINY, {**sd, "lm_head.weight": sd["wte.weight"] * 2}, config=cfg_json)
    with pytest.raises(MinisftError, match="ties the head to wte but lm_head.weight differs"):
        GPT.from_pretrained(folder)


def _cut(folder):
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _garble(folder):
    f = folder / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:24] = b"\x00\xff" * 8
    f.write_bytes(bytes(raw))


def _edit_config(**changes):
    def edit(folder):
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        for k, v in changes.items():
            if v is None:
                del cfg[k]
        (folder / "config.json").write_text(json.dumps(cfg))
    return edit


def _edit_weights(fn):
    def edit(folder):
        sd = gpt2_state(TINY_TIED)
        fn(sd)
        write_gpt2_folder(folder, TINY, sd)
    return edit


def _dup(folder):
    sd = gpt2_state(TINY_TIED)
    tensors = {"transformer." + k: ("F32", v) for k, v in sd.items()}
    tensors["wte.weight"] = ("F32", sd["wte.weight"])
    write_safetensors(folder / "model.safetensors", tensors)


def _nan(sd):
    sd["h.0.ln_2.bias"][3] = np.nan


# (how to break the folder, file the message names, words it contains)
BROKEN = {
    "truncated": (_cut, "model.safetensors", ["truncated"]),
    "garbled header": (_garble, "model.safetensors", ["not valid UTF-8 JSON"]),
    "wrong shape": (_edit_weights(lambda sd: sd.update({"h.1.mlp.c_fc.weight": sd["h.1.mlp.c_fc.weight"].T})),
                    "model.safetensors", ["'h.1.mlp.c_fc.weight' has shape (64, 16)", "needs (16, 64)"]),
    "missing tensor": (_edit_weights(lambda sd: sd.pop("ln_f.bias")), "model.safetensors", ["missing ln_f.bias"]),
    "unexpected tensor": (_edit_weights(lambda sd: sd.update({"h.0.attn.extra": np.ones(3, np.float32)})),
                          "model.safetensors", ["unexpected h.0.attn.extra"]),
    "non-finite": (_edit_weights(_nan), "model.safetensors", ["'h.0.ln_2.bias' holds 1 non-finite"]),
    "prefix twice": (_dup, "model.safetensors", ["'wte.weight' appears both with and without"]),
    "config not JSON": (lambda f: (f / "config.json").write_text("{oops"), "config.json", ["cannot read"]),
    "config field missing": (_edit_config(n_embd=None), "config.json", ["n_embd is missing"]),
    "config field wrong type": (_edit_config(n_layer="2"), "config.json", ["n_layer must be a positive integer"]),
    "config other activation": (_edit_config(activation_function="relu"), "config.json",
                                ["activation_function is 'relu'", "'gelu_new'"]),
    "config other model": (_edit_config(model_type="bert"), "config.json", ["model_type is 'bert'"]),
    "config bad heads": (_edit_config(n_head=3), "config.json", ["emb_dim 16 is not divisible by n_heads 3"]),
    "config other mlp width": (_edit_config(n_inner=32), "config.json", ["n_inner is 32", "4 * n_embd = 64"]),
    "config other layernorm": (_edit_config(layer_norm_epsilon=1e-6), "config.json", ["layer_norm_epsilon is 1e-06"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_folders_are_refused(tmp_path, case):
    breaker, fname, words = BROKEN[case]
    folder = write_gpt2_folder(tmp_path / "m", TINY, gpt2_state(TINY_TIED))
    breaker(folder)
    with pytest.raises(MinisftError) as e:
        GPT.from_pretrained(folder)
    msg = str(e.value)
    assert str(folder / fname) in msg
    for w in words:
        assert w in msg


def test_infinite_half_precision_value_is_refused(tmp_path):
    sd = gpt2_state(TINY_TIED)
    sd["wpe.weight"][0, 0] = 1e6  # beyond float16's range: inf once stored as F16
    with np.errstate(over="ignore"):
        folder = write_gpt2_folder(tmp_path / "m", TINY, sd, code="F16")
    with pytest.raises(MinisftError, match=r"'wpe\.weight' holds 1 non-finite"):
        GPT.from_pretrained(folder)


def test_mask_buffer_names_are_matched_exactly(tmp_path):
    """Only h.{i}.attn.bias / masked_bias are skipped: a stray name that merely ends alike is not."""
    sd = gpt2_state(TINY_TIED)
    folder = tmp_path / "m"
    write_gpt2_folder(folder, TINY, sd)
    tensors = {k: ("F32", v) for k, v in sd.items()}
    tensors["h.0.attn.biasx"] = ("F32", np.ones(2, np.float32))
    write_safetensors(folder / "model.safetensors", tensors)
    with pytest.raises(MinisftError, match=r"unexpected h\.0\.attn\.biasx"):
        GPT.from_pretrained(folder)


def test_the_export_holds_one_tensor_on_the_host_at_a_time(tmp_path):
    """A model whose host copies are new arrays (numba bfloat16 keeps float32 masters beside bf16
    copies; to_numpy copies) is exported tensor by tensor: the export's extra memory is about its
    largest tensor, not the whole model (which a run's memory plan does not count at its end)."""
    import tracemalloc

    from minisft.pretrained import read_pretrained, save_pretrained
    from tests.helpers import backend_or_skip
    try:
        B = backend_or_skip("numba", "bfloat16")
    except ValueError as e:  # a CPU without bf16 units
        pytest.skip(str(e))
    model = GPT(GPTConfig.preset("gpt2-tiny"), backend=B, dtype="bfloat16", seed=0)
    total = sum(int(np.prod(p.shape)) * 4 for p in model.params.values())
    largest = max(int(np.prod(p.shape)) * 4 for p in model.params.values())
    assert largest < 0.6 * total  # wte and lm_head: each half the model
    tracemalloc.start()
    save_pretrained(model, tmp_path / "hf")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < largest + total // 10, (peak, largest, total)
    _, sd = read_pretrained(tmp_path / "hf")
    assert all(np.array_equal(sd[n], model.B.to_numpy(p)) for n, p in model.params.items())  # bit-exact still
