"""The Llama family's whole model (minisft/llama.py run by minisft/model.py) equals Hugging Face's own
LlamaForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM under PyTorch autograd: logits, loss and
every parameter's gradient, on tiny random models that use every feature (grouped-query attention,
q/k/v biases, q/k norm, an explicit head width, llama3 rope scaling, tied and untied heads).

Tolerances (norm-relative): float64 logits and loss 1e-10, gradients 1e-9; float32 logits and loss
1e-5, gradients 1e-4. Hugging Face computes three things in float32 whatever the model's dtype: the
rotation angles, RMSNorm and (eager) softmax. The float64 comparison therefore runs its RMSNorm in
the model's dtype, its attention through SDPA (float64 throughout), and gives both models the same
angles: Hugging Face's own inv_freq, the angle arithmetic in float64 on both sides. Our inv_freq
formula is checked against Hugging Face's separately, at float32 precision.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from minisft.llama import LlamaConfig, config_from_hf, from_hf, hf_array, hf_layout, inv_frequencies  # noqa: E402
from minisft.model import GPT  # noqa: E402
from tests.helpers import book_like_batch, rel_err  # noqa: E402

ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
COMMON = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
              max_position_embeddings=128)
ARCHS = {
    "llama-gqa-llama3-untied": ("LlamaConfig", "LlamaForCausalLM",
                                dict(num_key_value_heads=2, rope_scaling=ROPE_LLAMA3, rope_theta=500.0,
                                     tie_word_embeddings=False, rms_norm_eps=1e-5)),
    "llama-mqa-tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen2-bias-tied": ("Qwen2Config", "Qwen2ForCausalLM",
                        dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3-qknorm-headdim": ("Qwen3Config", "Qwen3ForCausalLM",
                             dict(num_key_value_heads=3, head_dim=12, tie_word_embeddings=False)),
}


def hf_model(kind, dtype):
    conf_cls, model_cls, extra = ARCHS[kind]
    conf = getattr(transformers, conf_cls)(**COMMON, **extra, attn_implementation="sdpa")
    torch.manual_seed(0)
    m = getattr(transformers, model_cls)(conf).to(dtype)
    with torch.no_grad():  # norm weights and biases away from their 1 / 0 start, so their gradients matter
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return m


def ours_from(m, backend, dtype) -> GPT:
    cfg = config_from_hf(m.config.to_dict())
    sd = {n: t.detach().double().numpy() for n, t in m.state_dict().items()}
    sd = {n: a for n, a in sd.items() if n in hf_layout(cfg)}  # a tied model also lists lm_head.weight
    return GPT(cfg, backend=backend, dtype=dtype, params=from_hf(sd, cfg))


def same_angles_in_float64(m, ours: GPT):
    """Both models on Hugging Face's inv_freq, angles computed in float64 (see the module docstring)."""
    rot = m.model.rotary_emb
    inv = rot.inv_freq.detach().double()                                          # (hd/2,)

    def forward(x, position_ids):
        freqs = position_ids[..., None].double() * inv                            # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * rot.attention_scaling).to(x.dtype), (emb.sin() * rot.attention_scaling).to(x.dtype)
    rot.forward = forward
    for mod in m.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            mod.forward = lambda x, mod=mod: mod.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                                                             + mod.variance_epsilon))
    angles = np.outer(np.arange(ours.cfg.context_length), inv.numpy())
    ours.rope = tuple(ours.B.from_numpy(t) for t in (np.cos(angles), np.sin(angles)))


def hf_loss_and_grads(m, ids, targets):
    logits = m(input_ids=torch.tensor(ids)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             torch.tensor(targets).reshape(-1), ignore_index=-100)
    loss.backward()
    grads = {n: p.grad.double().numpy() for n, p in m.named_parameters()}
    return logits.detach().double().numpy(), loss.item(), grads


@pytest.mark.parametrize("kind", list(ARCHS))
@pytest.mark.parametrize("dtype,tol_out,tol_grad", [("float64", 1e-10, 1e-9), ("float32", 1e-5, 1e-4)])
def test_logits_loss_and_every_gradient_equal_transformers_under_autograd(kind, dtype, tol_out, tol_grad):
    m = hf_model(kind, torch.float64 if dtype == "float64" else torch.float32)
    ours = ours_from(m, "numpy", dtype)
    if dtype == "float64":
        same_angles_in_float64(m, ours)
    rng = np.random.default_rng(7)
    ids, targets = book_like_batch(rng, 96, [11, 7, 14])   # padded batch, -100 past each sequence's end
    hf_logits, hf_loss, hf_grads = hf_loss_and_grads(m, ids, targets)
    assert rel_err(ours.logits(ids), hf_logits) <= tol_out
    loss, grads = ours.loss_and_grad(ids, targets)
    assert abs(loss - hf_loss) / abs(hf_loss) <= tol_out
    layout = hf_layout(ours.cfg)
    for name, g in hf_grads.items():
        if name == "lm_head.weight" and ours.cfg.tie_embeddings:
            continue  # the same tensor as embed_tokens: its gradient is embed_tokens'
        piece = layout[name]
        err = rel_err(hf_array(piece, grads[piece.ours]), g)
        assert err <= tol_grad, f"{kind} {dtype}: d{name} relative error {err:.2e}"


@pytest.mark.parametrize("kind", ["llama-gqa-llama3-untied", "qwen2-bias-tied"])
def test_our_inverse_frequencies_equal_transformers_to_float32_precision(kind):
    m = hf_model(kind, torch.float32)
    cfg = config_from_hf(m.config.to_dict())
    ours = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    np.testing.assert_allclose(ours, m.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)


def test_config_round_trips_through_hugging_face_and_refuses_what_the_kernels_lack():
    from minisft.llama import hf_config
    m = hf_model("llama-gqa-llama3-untied", torch.float32)
    cfg = config_from_hf(m.config.to_dict())
    assert isinstance(cfg, LlamaConfig) and cfg.n_kv_heads == 2 and cfg.rope_scaling.factor == 4.0
    again = transformers.LlamaConfig(**hf_config(cfg))
    assert config_from_hf(again.to_dict()) == cfg
    for bad, says in ((dict(hidden_act="gelu"), "hidden_act"), (dict(mlp_bias=True), "mlp_bias"),
                      (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "yarn"),
                      (dict(model_type="mistral"), "mistral")):
        with pytest.raises(ValueError, match=says):
            config_from_hf({**m.config.to_dict(), **bad})


@pytest.mark.parametrize("backend", ["numpy", "numba", "torch"])
@pytest.mark.parametrize("kind", ["llama-gqa-llama3-untied", "qwen2-bias-tied", "qwen3-qknorm-headdim"])
def test_greedy_generation_with_the_kv_cache_equals_transformers_generate_token_for_token(kind, backend):
    from minisft.generate import generate
    m = hf_model(kind, torch.float64)
    ours = ours_from(m, backend, "float64")
    same_angles_in_float64(m, ours)
    prompts = [[5, 17, 33, 2, 90], [7, 7, 61]]
    got = generate(ours, prompts, 12, eos_id=None)
    for p, g in zip(prompts, got):
        want = m.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert g == want


@pytest.mark.parametrize("backend,dtype,tol", [("numba", "float32", 1e-5), ("torch", "float32", 1e-5),
                                               ("numba", "bfloat16", 3e-2), ("torch", "bfloat16", 3e-2)])
def test_every_backend_runs_the_whole_llama_model_like_the_numpy_reference(backend, dtype, tol):
    """Logits and every gradient of a tiny Qwen3 (every op of the family but the llama3 scaling, which
    the kernels never see: it only changes the rope tables) against numpy float32."""
    from minisft.backends import dtype_problem
    if problem := dtype_problem(dtype, backend):
        pytest.skip(problem)
    m = hf_model("qwen3-qknorm-headdim", torch.float32)
    ref, other = ours_from(m, "numpy", "float32"), ours_from(m, backend, dtype)
    ids, targets = book_like_batch(np.random.default_rng(3), 96, [9, 16, 4])
    assert rel_err(other.logits(ids), ref.logits(ids)) <= tol
    (loss_r, g_r), (loss_o, g_o) = ref.loss_and_grad(ids, targets), other.loss_and_grad(ids, targets)
    assert abs(loss_o - loss_r) <= tol * abs(loss_r)
    for name in g_r:
        assert rel_err(g_o[name], g_r[name]) <= 10 * tol, name
