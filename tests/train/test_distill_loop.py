"""Distillation objective (sea_jax.train.distill): the paired forward reproduces the LM, each
term is checked against the dense forms of sea_jax.distill computed from the models' own
outputs, the teacher gets no gradient, and the train loop runs objective=distill end to end
from a hand-written safetensors teacher. Tiny random models, float32, tolerances 1e-5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_pretrained import write_hf_dir

from sea_jax import distill as losses
from sea_jax.model.config import LMConfig
from sea_jax.model.transformer import LanguageModel
from sea_jax.ops.sea_select import row_geometry
from sea_jax.train import distill
from sea_jax.train.params import ModelParts, split_model

SEA_OPTS = {"sea": {"k": 2, "t_m": 8, "chunk": 4, "block_q": 8, "block_k": 8}}
BASE = dict(vocab_size=41, width=16, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=24, init_std=0.2)


def _copy_backbone(dst, src):
    """dst gets src's embeddings, norms, projections and MLPs (a student initialised from the
    teacher, with its own core parameters)."""
    sp, _ = split_model(src)
    graphdef, params, rest = nnx.split(dst, nnx.Param, ...)
    flat = dict(nnx.to_flat_state(params))
    for path, var in flat.items():
        key = ".".join(str(p) for p in path)
        if key in sp:
            var.set_value(sp[key])
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


@pytest.fixture(scope="module")
def models():
    teacher = LanguageModel(LMConfig(**BASE), rngs=nnx.Rngs(0))
    student = LanguageModel(
        LMConfig(**BASE, layer_attention=("sea", "sea", "dense"), attention_options=SEA_OPTS), rngs=nnx.Rngs(1)
    )
    return teacher, _copy_backbone(student, teacher)


def _tokens(T, seed=0, B=2):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 41, size=(B, T)), jnp.int32)


def test_paired_forward_self_is_exact(models):
    teacher, _ = models
    tokens = _tokens(12)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    for seg in (None, jnp.asarray([[1] * 5 + [2] * 7, [1] * 12])):
        w = losses.DistillWeights()
        ls, lt, hidden, layers, terms = distill.paired_forward(teacher, teacher, tokens, positions, seg, w)
        want = teacher(tokens, positions=positions, segment_ids=seg).logits
        np.testing.assert_allclose(ls, want, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(lt, want, atol=1e-5, rtol=1e-5)
        assert float(hidden) == 0.0
        for name in ("attention_kl", "attention_mse", "context_mse"):
            assert abs(float(terms[name])) < 1e-6, name
        assert abs(float(layers)) < 1e-6


def _teacher_internals(teacher, tokens, positions, seg):
    """Per layer: (rotated q, k, core output, probs) of the teacher, computed through the
    model's own modules layer by layer (SelfAttention's projections + core call)."""
    out = teacher(tokens, positions=positions, segment_ids=seg, return_hidden=True)
    xs = [jnp.take(teacher.embed[...], tokens, axis=0)] + list(out.hidden)
    rows = row_geometry(seg, *tokens.shape, causal=True)[:2]
    result = []
    for i in range(teacher.cfg.num_layers):
        block = teacher.stages[0].layer(i)
        h = block.attn_norm(xs[i])
        q, k = losses.projected_qk(block.attn, h, positions)
        v = jnp.einsum("bte,ekd->btkd", h, block.attn.v_proj[...])
        core_out = block.attn.core(q, k, v, segment_ids=seg).out
        result.append((q, k, core_out, losses.attention_probs(q, k, *rows)))
    return out, result, rows


def test_paired_forward_terms_match_dense_forms(models):
    teacher, student = models
    T = 16
    tokens = _tokens(T, seed=3)
    positions = jnp.broadcast_to(jnp.arange(T), (2, T))
    seg = jnp.asarray([[1] * 9 + [2] * 7, [1] * 16])
    w = losses.DistillWeights(estimate_kl=0.3, estimate_mse=2.0, attention_kl=0.5, attention_mse=3.0, context_mse=1.5)
    ls, lt, hidden, layers, terms = distill.paired_forward(student, teacher, tokens, positions, seg, w)

    t_out, t_layers, rows = _teacher_internals(teacher, tokens, positions, seg)
    s_out = student(tokens, positions=positions, segment_ids=seg, return_hidden=True, return_aux=True)
    np.testing.assert_allclose(ls, s_out.logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lt, t_out.logits, atol=1e-5, rtol=1e-5)
    emb = jnp.take(teacher.embed[...], tokens, axis=0)
    s_h = [emb] + list(s_out.hidden)
    t_h = [emb] + list(t_out.hidden)
    want_hidden = np.mean([np.mean((np.asarray(a) - np.asarray(b)) ** 2) for a, b in zip(s_h, t_h)])
    np.testing.assert_allclose(hidden, want_hidden, rtol=1e-5, atol=1e-9)
    assert float(hidden) > 0  # layers 1-2 are SEA: the hidden states differ

    want_terms = {n: [] for n in distill.LAYER_TERMS}
    want_total = []
    for i, (q_t, k_t, o_t, p_t) in enumerate(t_layers):
        block = student.stages[0 if i < 2 else 1].layer(i if i < 2 else 0)
        h = block.attn_norm(s_h[i])
        q_s, k_s = losses.projected_qk(block.attn, h, positions)
        v_s = jnp.einsum("bte,ekd->btkd", h, block.attn.v_proj[...])
        res = block.attn.core(q_s, k_s, v_s, segment_ids=seg, return_aux=(i < 2))
        a = losses.attention_loss_dense(losses.attention_probs(q_s, k_s, *rows), p_t)
        c = float(np.mean((np.asarray(res.out) - np.asarray(o_t)) ** 2))
        if i < 2:
            pooled = losses.pool_attention(q_t, k_t, *rows, 8)
            e = losses.estimate_loss(res.aux["estimate"], pooled, rows[1], key_length=T)
        else:
            e = {"kl": 0.0, "mse": 0.0}
        vals = {"estimate_kl": e["kl"], "estimate_mse": e["mse"], "attention_kl": a["kl"], "attention_mse": a["mse"],
                "context_mse": c}
        for n in distill.LAYER_TERMS:
            want_terms[n].append(float(vals[n]))
        want_total.append(sum(getattr(w, n) * float(vals[n]) for n in distill.LAYER_TERMS))
    for n in distill.LAYER_TERMS:
        np.testing.assert_allclose(terms[n], np.mean(want_terms[n]), rtol=2e-5, atol=1e-8, err_msg=n)
    np.testing.assert_allclose(layers, np.mean(want_total), rtol=2e-5)
    assert float(terms["estimate_kl"]) > 0 and float(terms["context_mse"]) > 0


def _micro(T, seed=0):
    tokens = np.random.default_rng(seed).integers(0, 41, size=(2, T + 1))
    seg = np.asarray([[1] * 6 + [2] * (T - 6), [1] * T])
    mask = np.ones((2, T), np.int32)
    mask[0, 5] = 0  # last token of document 1 predicts nothing
    pos = np.concatenate([np.arange(6), np.arange(T - 6)])[None].repeat(2, 0)
    pos[1] = np.arange(T)
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
            "positions": jnp.asarray(pos, jnp.int32), "segment_ids": jnp.asarray(seg, jnp.int32),
            "loss_mask": jnp.asarray(mask)}


def test_loss_fn_contract_and_no_teacher_gradient(models):
    teacher, student = models
    s_parts, t_parts = ModelParts.build(student.cfg), ModelParts.build(teacher.cfg)
    params, rest = split_model(student)
    t_params, t_rest = split_model(teacher)
    w = losses.DistillWeights()
    loss_fn = distill.build_distill_loss(s_parts, t_parts, w)
    micro = _micro(16)
    extra = {"params": t_params, "rest": t_rest}
    loss_sum, count, metrics = jax.jit(loss_fn)(params, rest, micro, extra)
    assert float(count) == 31.0
    m = {k: float(v) / float(count) for k, v in metrics.items()}
    np.testing.assert_allclose(float(loss_sum) / 31.0, m["distill/total"], rtol=1e-6)
    want = w.lm * m["distill/lm"] + w.hidden_mse * m["distill/hidden_mse"] + w.logit_kl * m["distill/logit_kl"] \
        + m["distill/layers"]
    np.testing.assert_allclose(m["distill/total"], want, rtol=1e-5)
    # LM term against a direct masked cross-entropy of the student's logits
    logits = student(micro["inputs"], positions=micro["positions"], segment_ids=micro["segment_ids"]).logits
    logp = jax.nn.log_softmax(logits, -1)
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(micro["targets"])[..., None], -1)[..., 0]
    np.testing.assert_allclose(m["distill/lm"], (nll * np.asarray(micro["loss_mask"])).sum() / 31.0, rtol=1e-5)

    grads = jax.jit(jax.grad(lambda p, e: loss_fn(p, rest, micro, e)[0], argnums=(0, 1)))(params, extra)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads[1]))
    core = [k for k in grads[0] if "attn.core.enc_w" in k]
    assert core and float(jnp.abs(grads[0][core[0]]).max()) > 0  # the estimator learns
    assert float(jnp.abs(grads[0]["embed"]).max()) > 0


def test_layer_count_mismatch_is_an_error(models):
    teacher, _ = models
    other = LanguageModel(LMConfig(**{**BASE, "num_layers": 2}), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="student has 2 layers, teacher 3"):
        distill._layer_segments(other, teacher)


# --------------------------------------------------------------------------------------
# end to end through the train loop
# --------------------------------------------------------------------------------------

def test_train_loop_distill_end_to_end(tmp_path, models):
    pytest.importorskip("draccus")
    pytest.importorskip("grain")
    from sea_jax.pretrained import load_pretrained
    from sea_jax.train.config import parse_config
    from sea_jax.train.loop import train

    teacher, _ = models
    teacher_dir = tmp_path / "teacher"
    write_hf_dir(teacher, teacher_dir)
    loaded = load_pretrained(teacher_dir)  # the directory round-trips to the same model
    tokens = _tokens(10, seed=5)
    np.testing.assert_allclose(loaded.model(tokens).logits, teacher(tokens).logits, atol=1e-5)

    cfg = parse_config([
        f"--init_from={teacher_dir}", "--objective=distill", f"--distill.teacher={teacher_dir}",
        "--model.attention=sea", '--model.attention_options={"sea": {"k": 2, "t_m": 8, "chunk": 4, "block_q": 8, "block_k": 8}}',
        "--data.source=synthetic", "--data.seq_len=16", "--train.steps=3", "--train.global_batch_size=2",
        "--train.eval_every=0", "--train.log_every=1", "--checkpoint.every_steps=0", "--checkpoint.async_save=false",
        "--metrics.progress_bar=false", "--metrics.tensorboard=false", "--optim.lr=1e-3", "--optim.warmup_steps=0",
        f"--output_dir={tmp_path / 'run'}",
    ])
    result = train(cfg)
    logged = [h for h in result.history if "loss" in h]
    assert len(logged) == 3
    for h in logged:
        assert np.isfinite(h["loss"]) and h["distill/estimate_kl"] > 0
        np.testing.assert_allclose(h["loss"], h["distill/total"], rtol=1e-5)
    assert result.parts.config.layer_names() == ("sea",) * 3
