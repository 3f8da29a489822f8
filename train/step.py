"""The jitted train and eval steps.

A batch is a dict of int32 arrays [accum, batch, seq] (``accum`` micro-batches per optimizer
step; the batch axis is split over the mesh's data x fsdp axes)::

    inputs       tokens fed to the model
    targets      the next token of every input position
    positions    RoPE positions (restart at 0 in every packed document)
    segment_ids  document id within the row (0 = padding): attention never crosses documents
    loss_mask    1 where the target counts in the loss (same document, not padding)

The loss is the mean next-token cross-entropy over all counted targets of the whole global
batch, so accumulating micro-batches gives exactly the full-batch gradient (up to summation
order). Mixed precision: parameters stay float32 (master weights) and the model casts them to
``LMConfig.dtype`` (bfloat16 on accelerators) for its matmuls; gradients and optimizer math are
float32. Remat follows ``LMConfig.remat``. The state is donated: its buffers are reused for the
new state.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sea_jax.train import mesh as mesh_lib
from sea_jax.train.optim import Optimizer, global_norm
from sea_jax.train.params import ModelParts

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "loss_mask")


def _logits_sharding(mesh: Mesh, vocab: int) -> NamedSharding:
    tensor = mesh.shape["tensor"]
    vocab_axis = "tensor" if tensor > 1 and vocab % tensor == 0 else None
    return NamedSharding(mesh, P(mesh_lib.BATCH_AXES, None, vocab_axis))


def token_losses(parts: ModelParts, mesh: Mesh | None, params, rest, micro: dict[str, jax.Array]):
    """Sum of masked next-token cross-entropies and the number of counted targets.

    micro: one micro-batch, each entry [batch, seq]. Returns (loss_sum f32 [], count f32 [])."""
    model = parts.merge(params, rest)
    out = model(micro["inputs"], positions=micro["positions"], segment_ids=micro["segment_ids"])
    logits = out.logits
    if mesh is not None:
        # keep [B, T, V] split over the batch (and the vocabulary under tensor parallelism);
        # without this XLA may gather the largest activation of the step onto every device
        logits = jax.lax.with_sharding_constraint(logits, _logits_sharding(mesh, logits.shape[-1]))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), micro["targets"])
    mask = micro["loss_mask"].astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def make_train_step(
    parts: ModelParts,
    opt: Optimizer,
    mesh: Mesh,
    state_shardings: dict[str, Any],
    batch_sharding: NamedSharding,
) -> Callable:
    """``step(state, batch) -> (new_state, metrics)`` compiled with explicit shardings.

    metrics: loss (mean over counted targets), tokens (count), grad_norm (global norm of the
    trainable gradient before clipping); all replicated float32 scalars."""
    trainable = opt.trainable

    def loss_fn(params, rest, micro):
        # frozen parameters get no gradient: stop_gradient lets autodiff skip their weight
        # gradients entirely instead of computing and discarding them
        params = {k: v if k in trainable else jax.lax.stop_gradient(v) for k, v in params.items()}
        return token_losses(parts, mesh, params, rest, micro)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        params, rest = state["params"], state["rest"]
        accum = batch["inputs"].shape[0]

        def micro_step(carry, micro):
            loss_sum, count, grads = carry
            (l, c), g = grad_fn(params, rest, micro)
            return (loss_sum + l, count + c, jax.tree.map(jnp.add, grads, g)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        carry = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
        if accum == 1:
            carry, _ = micro_step(carry, jax.tree.map(lambda x: x[0], batch))
        else:
            carry, _ = jax.lax.scan(micro_step, carry, batch)
        loss_sum, count, grads = carry
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grads = {k: jax.lax.with_sharding_constraint(g, state_shardings["params"][k]) for k, g in grads.items()}
        grad_norm = global_norm({k: g for k, g in grads.items() if k in trainable})
        updates, opt_state = opt.tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = dict(state, step=state["step"] + 1, params=new_params, opt_state=opt_state)
        metrics = {"loss": loss_sum / denom, "tokens": count, "grad_norm": grad_norm}
        return new_state, metrics

    rep = mesh_lib.replicated(mesh)
    batch_sh = {k: batch_sharding for k in BATCH_KEYS}
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sh),
        out_shardings=(state_shardings, {"loss": rep, "tokens": rep, "grad_norm": rep}),
        donate_argnums=(0,),
    )


def make_eval_step(parts: ModelParts, mesh: Mesh, state_shardings: dict[str, Any], batch_sharding: NamedSharding) -> Callable:
    """``eval_step(params, rest, batch) -> (loss_sum, count)`` over all micro-batches of
    ``batch``; perplexity = exp(sum of loss_sum / sum of count) over the validation batches."""

    def eval_step(params, rest, batch):
        def body(carry, micro):
            l, c = token_losses(parts, mesh, params, rest, micro)
            return (carry[0] + l, carry[1] + c), None

        (loss_sum, count), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), batch)
        return loss_sum, count

    rep = mesh_lib.replicated(mesh)
    return jax.jit(
        eval_step,
        in_shardings=(state_shardings["params"], state_shardings["rest"], {k: batch_sharding for k in BATCH_KEYS}),
        out_shardings=(rep, rep),
    )


def model_flops_per_token(parts: ModelParts, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (matmul parameters) + causal attention 6 L H D T
    (half of the 12 L H D T of full attention). The embedding lookup costs no matmul, but with
    tied embeddings the same matrix is the output head, so every parameter counts once.
    SEA/SparseK are credited with dense-attention FLOPs ("dense-equivalent MFU")."""
    cfg = parts.config
    n = parts.param_count()
    if not cfg.tie_embeddings:
        n -= cfg.vocab_size * cfg.width  # the untied input table is a gather
    return 6.0 * n + 6.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
