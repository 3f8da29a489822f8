"""The distillation objective (``objective: distill``): a student LM matches a pretrained teacher.

The SEA recipe (research/sea.md section 2): the student is the teacher with its attention
cores replaced (``init_from`` = the teacher, ``model.attention: sea``); both run on the same
tokens, layer by layer, and the loss is :func:`sea_jax.distill.distillation_loss`::

    w_lm * LM + w_hidden * hidden MSE (embeddings + every layer output) + w_logit * KL(teacher || student)
        + mean over layers of the per-layer loss

Per layer, SEA cores get :func:`sea_jax.distill.layer_loss` (estimate KL/MSE against the
teacher's attention pooled onto the t_m cells, student-attention KL/MSE, context MSE); every
other core (performer, sliding, sparsek, dense) gets the student-attention KL/MSE of its own
q/k plus the context MSE (its output before o_proj against the teacher core's), weighted the
same way. No term forms a T x T array (all blockwise in sea_jax.distill).

Contract with the train loop (train/step.py)::

    loss_fn, extra = make_distill_loss(cfg, parts, mesh)
    loss_fn(params, rest, micro, extra) -> (loss_sum, count, metrics)

``extra`` = {"params", "rest"}: the teacher's flat parameter dicts, placed on the mesh (sharded
like the student's parameters by the logical-axis rules); the teacher gets no gradient.

Both models run through :func:`paired_forward`, which scans over layers: consecutive layers
that share the student's core and the teacher's core form one ``lax.scan`` (a 30-layer SEA
student compiles one layer body), and the scan body is rematerialised when the student's
``remat`` is not "none".
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from sea_jax import distill as losses
from sea_jax.ops.rope import apply_rope
from sea_jax.ops.sea_select import row_geometry

LAYER_TERMS = ("estimate_kl", "estimate_mse", "attention_kl", "attention_mse", "context_mse")


# --------------------------------------------------------------------------------------
# one decoder block, exposing what the losses need
# --------------------------------------------------------------------------------------

def block_forward(block, x, positions, segment_ids, *, return_aux: bool):
    """One DecoderBlock on x [B, T, E], as ``DecoderBlock.__call__`` computes it, also
    returning the attention internals.

    Returns (x_out [B, T, E], q [B, T, H, D] and k [B, T, K, D] (rotated), core_out
    [B, T, H, D] (before o_proj), aux dict)."""
    attn = block.attn
    dt = attn.dtype
    h = block.attn_norm(x).astype(dt)
    q = apply_rope(jnp.einsum("bte,ehd->bthd", h, attn.q_proj[...].astype(dt)), positions, attn.rope_base)
    k = apply_rope(jnp.einsum("bte,ekd->btkd", h, attn.k_proj[...].astype(dt)), positions, attn.rope_base)
    v = jnp.einsum("bte,ekd->btkd", h, attn.v_proj[...].astype(dt))
    res = attn.core(q, k, v, x=h, segment_ids=segment_ids, return_aux=return_aux)
    out = jnp.einsum("bthd,hde->bte", res.out.astype(dt), attn.o_proj[...].astype(dt))
    x = x + out.astype(x.dtype)
    x = x + block.mlp(block.mlp_norm(x)).astype(x.dtype)
    return x, q, k, res.out, res.aux


def _layer_segments(student, teacher):
    """[(student stage index, first layer in that stage, teacher stage index, first layer in
    that stage, count)]: runs of layers where neither model changes stage."""
    def owners(model):
        out = []
        for s, stage in enumerate(model.stages):
            out.extend((s, i) for i in range(stage.count))
        return out

    so, to = owners(student), owners(teacher)
    if len(so) != len(to):
        raise ValueError(f"student has {len(so)} layers, teacher {len(to)}: distillation pairs layers one to one")
    segments = []
    for layer, (s_owner, t_owner) in enumerate(zip(so, to)):
        if segments and segments[-1][0] == s_owner[0] and segments[-1][2] == t_owner[0]:
            segments[-1][4] += 1
        else:
            segments.append([s_owner[0], s_owner[1], t_owner[0], t_owner[1], 1])
    return [tuple(s) for s in segments]


def _embed(model, tokens):
    return jnp.take(model.embed[...], tokens, axis=0).astype(model.cfg.compute_dtype)


def _logits(model, x):
    cfg = model.cfg
    x = model.final_norm(x)
    w = model.embed[...].T if cfg.tie_embeddings else model.lm_head[...]
    return jnp.einsum("bte,ev->btv", x.astype(cfg.compute_dtype), w.astype(cfg.compute_dtype)).astype(jnp.float32)


def _layer_terms(is_sea, aux, q_s, k_s, out_s, q_t, k_t, out_t, geometry, weights, block_q):
    """(weighted per-layer loss, {term: unweighted value}) for one layer."""
    if is_sea:
        return losses.layer_loss(aux, out_s, q_t, k_t, out_t, weights, block_q=block_q)
    row_start, row_length = geometry
    a = losses.attention_loss(q_s, k_s, jax.lax.stop_gradient(q_t), jax.lax.stop_gradient(k_t),
                              row_start, row_length, block_q=block_q)
    c = losses.context_loss(out_s, jax.lax.stop_gradient(out_t))
    zero = jnp.zeros((), jnp.float32)
    terms = {"estimate_kl": zero, "estimate_mse": zero, "attention_kl": a["kl"], "attention_mse": a["mse"],
             "context_mse": c}
    total = weights.attention_kl * a["kl"] + weights.attention_mse * a["mse"] + weights.context_mse * c
    return total, terms


def paired_forward(student, teacher, tokens, positions, segment_ids, weights: losses.DistillWeights, *,
                   block_q: int = 64):
    """Run student and teacher side by side on tokens [B, T].

    Returns (student logits [B, T, V] f32, teacher logits [B, T, V] f32, hidden MSE (mean over
    the embeddings and every layer output), mean over layers of the weighted per-layer loss,
    {term: mean over layers of the unweighted per-layer term}). The teacher is under
    stop_gradient."""
    B, T = tokens.shape
    geometry = row_geometry(segment_ids, B, T, causal=True)[:2]
    xs, xt = _embed(student, tokens), jax.lax.stop_gradient(_embed(teacher, tokens))
    hidden = [losses.context_loss(xs, xt)]
    layer_totals, layer_terms = [], {name: [] for name in LAYER_TERMS}
    remat = student.cfg.remat != "none"
    for s_stage, s_first, t_stage, t_first, count in _layer_segments(student, teacher):
        s_gd, s_state = nnx.split(student.stages[s_stage].blocks)
        t_gd, t_state = nnx.split(teacher.stages[t_stage].blocks)
        s_state = jax.tree.map(lambda a: a[s_first:s_first + count], s_state)
        t_state = jax.tree.map(lambda a: jax.lax.stop_gradient(a[t_first:t_first + count]), t_state)
        is_sea = student.stages[s_stage].attention == "sea"

        def body(carry, states, s_gd=s_gd, t_gd=t_gd, is_sea=is_sea):
            xs, xt = carry
            s_block, t_block = nnx.merge(s_gd, states[0]), nnx.merge(t_gd, states[1])
            xt, q_t, k_t, out_t, _ = block_forward(t_block, xt, positions, segment_ids, return_aux=False)
            xt = jax.lax.stop_gradient(xt)
            xs, q_s, k_s, out_s, aux = block_forward(s_block, xs, positions, segment_ids, return_aux=is_sea)
            total, terms = _layer_terms(is_sea, aux, q_s, k_s, out_s, q_t, k_t, out_t, geometry, weights, block_q)
            return (xs, xt), (losses.context_loss(xs, xt), total, terms)

        if remat:
            body = jax.checkpoint(body)
        (xs, xt), (h, totals, terms) = jax.lax.scan(body, (xs, xt), (s_state, t_state))
        hidden.append(h)
        layer_totals.append(totals)
        for name in LAYER_TERMS:
            layer_terms[name].append(terms[name])
    n_layers = student.cfg.num_layers
    hidden_mse = (hidden[0] + sum(jnp.sum(h) for h in hidden[1:])) / (n_layers + 1)
    layer_mean = sum(jnp.sum(t) for t in layer_totals) / n_layers
    term_means = {name: sum(jnp.sum(t) for t in values) / n_layers for name, values in layer_terms.items()}
    return _logits(student, xs), jax.lax.stop_gradient(_logits(teacher, xt)), hidden_mse, layer_mean, term_means


# --------------------------------------------------------------------------------------
# the loss function of the train loop
# --------------------------------------------------------------------------------------

def build_distill_loss(student_parts, teacher_parts, weights: losses.DistillWeights, *,
                       document_mask: bool = True, block_q: int = 64):
    """``loss_fn(params, rest, micro, extra)`` for the train step (see module docstring).

    student_parts / teacher_parts: sea_jax.train.params.ModelParts; extra = {"params": teacher
    params, "rest": teacher rest}. metrics (on loss_sum's scale, i.e. times the count):
    "distill/total", "distill/lm", "distill/hidden_mse", "distill/logit_kl", "distill/layers"
    (weighted per-layer mean) and every unweighted per-layer term "distill/<term>"."""

    def loss_fn(params, rest, micro, extra):
        student = student_parts.merge(params, rest)
        teacher = teacher_parts.merge(extra["params"], extra["rest"])
        segment_ids = micro["segment_ids"] if document_mask else None
        logits_s, logits_t, hidden, layers, terms = paired_forward(
            student, teacher, micro["inputs"], micro["positions"], segment_ids, weights, block_q=block_q
        )
        mask = micro["loss_mask"]
        lm = losses.lm_loss(logits_s, micro["targets"], mask)
        kl = losses.logit_kl(logits_s, logits_t, mask)
        total = weights.lm * lm + weights.hidden_mse * hidden + weights.logit_kl * kl + layers
        count = jnp.sum(mask.astype(jnp.float32))
        metrics = {"distill/total": total, "distill/lm": lm, "distill/hidden_mse": hidden, "distill/logit_kl": kl,
                   "distill/layers": layers, **{f"distill/{k}": v for k, v in terms.items()}}
        return total * count, count, {k: v * count for k, v in metrics.items()}

    return loss_fn


def load_teacher(source: str, *, dtype: str = "float32", param_dtype: str = "float32"):
    """(teacher ModelParts, params, rest) of a dense teacher from a load_pretrained source."""
    from sea_jax.pretrained import load_pretrained
    from sea_jax.train.params import ModelParts, split_model

    loaded = load_pretrained(source, attention="dense", dtype=dtype, param_dtype=param_dtype)
    params, rest = split_model(loaded.model)
    return ModelParts.build(loaded.config), params, rest


def place_teacher(teacher_parts, params, rest, mesh, rules=None) -> dict[str, Any]:
    """The teacher's arrays on ``mesh``: parameters sharded by their logical axes (the
    student's rules), other variables replicated."""
    from sea_jax.train import mesh as mesh_lib

    shardings = mesh_lib.param_shardings(
        {k: s.shape for k, s in teacher_parts.param_shapes.items()}, teacher_parts.param_logical, mesh,
        mesh_lib.DEFAULT_RULES if rules is None else rules, warn=False,
    )
    rep = mesh_lib.replicated(mesh)
    return {
        "params": {k: jax.device_put(v, shardings[k]) for k, v in params.items()},
        "rest": {k: jax.device_put(v, rep) for k, v in rest.items()},
    }


def make_distill_loss(cfg, parts, mesh):
    """(loss_fn, extra) for ``cfg.objective == "distill"`` (train/setup.py calls this).

    The teacher is ``cfg.distill.teacher`` loaded with dense attention in the student's dtype;
    its layer count must equal the student's (they are paired one to one)."""
    from sea_jax.train import mesh as mesh_lib
    from sea_jax.train.config import ConfigError

    try:
        teacher_parts, params, rest = load_teacher(
            cfg.distill.teacher, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype
        )
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"distill.teacher: {e}") from e
    t, s = teacher_parts.config, parts.config
    if t.num_layers != s.num_layers or t.vocab_size != s.vocab_size:
        raise ConfigError(
            f"distill.teacher: the teacher has {t.num_layers} layers and vocabulary {t.vocab_size}; the student "
            f"{s.num_layers} and {s.vocab_size} (set init_from to the teacher, or match model.num_layers/vocab_size)"
        )
    extra = place_teacher(teacher_parts, params, rest, mesh, mesh_lib.merged_rules(cfg.mesh.rules))
    loss_fn = build_distill_loss(parts, teacher_parts, cfg.distill.weights, document_mask=cfg.data.document_mask)
    return loss_fn, extra


__all__ = ["block_forward", "paired_forward", "build_distill_loss", "load_teacher", "place_teacher", "make_distill_loss"]
