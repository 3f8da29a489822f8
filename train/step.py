"""The jitted train and eval steps, and the loss-function contract.

A batch is a dict of int32 arrays [accum, batch, seq] (``accum`` micro-batches per optimizer
step; the batch axis is split over the mesh's data x fsdp axes)::

    inputs       tokens fed to the model
    targets      the next token of every input position
    positions    RoPE positions (restart at 0 in every packed document)
    segment_ids  document id within the row (0 = padding): attention never crosses documents
    loss_mask    1 where the target counts in the loss (same document, not padding)

The loss is the sum of per-micro-batch loss sums divided by the total count of the whole
global batch, so accumulating micro-batches gives exactly the full-batch gradient (up to
summation order). Mixed precision: parameters stay float32 (master weights) and the model casts
them to ``LMConfig.dtype`` (bfloat16 on accelerators) for its matmuls; gradients and optimizer
math are float32. Remat follows ``LMConfig.remat``. The state is donated: its buffers are reused
for the new state.

Loss-function contract (``objective: distill`` plugs in here; sea_jax.train.distill)::

    loss_fn(params, rest, micro, extra) -> (loss_sum, count, metrics)

* ``params`` / ``rest``: the flat parameter dicts of train/params.py (``parts.merge(params,
  rest)`` rebuilds the model); frozen parameters arrive wrapped in ``stop_gradient``;
* ``micro``: one micro-batch, the BATCH_KEYS above, each [batch, seq];
* ``extra``: any pytree of arrays the loss needs besides the student (the teacher's parameters),
  passed to the jitted step as an *argument*, never closed over (a closed-over array would be
  baked into the executable as a constant, replicated and re-uploaded). Its leaves must be
  ``jax.Array`` (or, for ahead-of-time compilation, ``jax.ShapeDtypeStruct``) already placed
  on the mesh: their ``.sharding`` becomes the step's in_sharding. ``None`` when unused;
* returns ``loss_sum`` (f32 [], the loss summed over the micro-batch's counted targets),
  ``count`` (f32 [], how many targets counted) and ``metrics`` (dict name -> f32 [], on the
  scale of ``loss_sum``: summed over micro-batches and divided by the total count, like the
  loss; e.g. a distillation term ``w * term_mean * count``).

The default (``loss_fn=None``) is :func:`lm_loss`, next-token cross-entropy with no metrics.
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

LossFn = Callable[[dict, dict, dict, Any], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


def _logits_sharding(mesh: Mesh, vocab: int) -> NamedSharding:
    tensor = mesh.shape["tensor"]
    vocab_axis = "tensor" if tensor > 1 and vocab % tensor == 0 else None
    return NamedSharding(mesh, P(mesh_lib.BATCH_AXES, None, vocab_axis))


def token_losses(parts: ModelParts, mesh: Mesh | None, params, rest, micro: dict[str, jax.Array],
                 document_mask: bool = True):
    """Sum of masked next-token cross-entropies and the number of counted targets.

    micro: one micro-batch, each entry [batch, seq]. document_mask: pass the segment ids to the
    model (False: attention may cross packed documents). Returns (loss_sum f32 [], count f32 [])."""
    model = parts.merge(params, rest)
    segment_ids = micro["segment_ids"] if document_mask else None
    out = model(micro["inputs"], positions=micro["positions"], segment_ids=segment_ids)
    logits = out.logits
    if mesh is not None:
        # keep [B, T, V] split over the batch (and the vocabulary under tensor parallelism);
        # without this XLA may gather the largest activation of the step onto every device
        logits = jax.lax.with_sharding_constraint(logits, _logits_sharding(mesh, logits.shape[-1]))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), micro["targets"])
    mask = micro["loss_mask"].astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(mask)


def lm_loss(parts: ModelParts, mesh: Mesh | None, document_mask: bool = True) -> LossFn:
    """The default loss_fn: masked next-token cross-entropy (``extra`` is ignored)."""

    def loss_fn(params, rest, micro, extra):
        del extra
        loss_sum, count = token_losses(parts, mesh, params, rest, micro, document_mask)
        return loss_sum, count, {}

    return loss_fn


def extra_shardings(extra) -> Any:
    """in_shardings of the ``extra`` argument: each leaf's own sharding."""
    def sharding_of(leaf):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            raise ValueError(
                "extra: every leaf must be a jax.Array (or ShapeDtypeStruct) placed on the mesh, "
                f"got {type(leaf).__name__}"
            )
        return sharding

    return jax.tree.map(sharding_of, extra)


def make_train_step(
    parts: ModelParts,
    opt: Optimizer,
    mesh: Mesh,
    state_shardings: dict[str, Any],
    batch_sharding: NamedSharding,
    *,
    loss_fn: LossFn | None = None,
    extra=None,
) -> Callable:
    """``step(state, batch, extra) -> (new_state, metrics)`` compiled with explicit shardings.

    loss_fn / extra: see the module docstring (default: next-token cross-entropy, extra None).
    ``extra`` here is only used for its shardings and structure; pass the arrays at call time.
    metrics: loss (loss_sum / count over the global batch), tokens (count), grad_norm (global
    norm of the trainable gradient before clipping), plus loss_fn's metrics; all replicated
    float32 scalars."""
    trainable = opt.trainable
    loss_fn = loss_fn or lm_loss(parts, mesh)

    def objective(params, rest, micro, extra):
        # frozen parameters get no gradient: stop_gradient lets autodiff skip their weight
        # gradients entirely instead of computing and discarding them
        params = {k: v if k in trainable else jax.lax.stop_gradient(v) for k, v in params.items()}
        loss_sum, count, metrics = loss_fn(params, rest, micro, extra)
        return loss_sum, (count, metrics)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def step(state, batch, extra):
        params, rest = state["params"], state["rest"]
        accum = batch["inputs"].shape[0]

        def micro_terms(micro):
            (l, (c, m)), g = grad_fn(params, rest, micro, extra)
            m = {k: v.astype(jnp.float32) for k, v in m.items()}
            return l.astype(jnp.float32), c.astype(jnp.float32), m, g

        # the first micro-batch starts the sums (this also fixes the metric names); a scan
        # adds the others, keeping one micro-batch of activations alive at a time
        carry = micro_terms(jax.tree.map(lambda x: x[0], batch))
        if accum > 1:
            add = lambda carry, micro: (jax.tree.map(jnp.add, carry, micro_terms(micro)), None)  # noqa: E731
            carry, _ = jax.lax.scan(add, carry, jax.tree.map(lambda x: x[1:], batch))
        loss_sum, count, metric_sums, grads = carry
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grads = {k: jax.lax.with_sharding_constraint(g, state_shardings["params"][k]) for k, g in grads.items()}
        grad_norm = global_norm({k: g for k, g in grads.items() if k in trainable})
        updates, opt_state = opt.tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        new_state = dict(state, step=state["step"] + 1, params=new_params, opt_state=opt_state)
        metrics = {"loss": loss_sum / denom, "tokens": count, "grad_norm": grad_norm}
        metrics.update({k: v / denom for k, v in metric_sums.items()})
        return new_state, metrics

    rep = mesh_lib.replicated(mesh)
    batch_sh = {k: batch_sharding for k in BATCH_KEYS}
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sh, extra_shardings(extra)),
        out_shardings=(state_shardings, rep),  # every metric replicated
        donate_argnums=(0,),
    )


def make_eval_step(
    parts: ModelParts,
    mesh: Mesh,
    state_shardings: dict[str, Any],
    batch_sharding: NamedSharding,
    *,
    loss_fn: LossFn | None = None,
    extra=None,
) -> Callable:
    """``eval_step(params, rest, batch, extra) -> (loss_sum, count, metric_sums)`` summed over
    all micro-batches of ``batch``; with the default loss, perplexity = exp(total loss_sum /
    total count) over the validation batches. Metric sums are on loss_sum's scale (divide by
    the total count)."""
    loss_fn = loss_fn or lm_loss(parts, mesh)

    def eval_step(params, rest, batch, extra):
        def terms(micro):
            l, c, m = loss_fn(params, rest, micro, extra)
            return jax.tree.map(lambda x: x.astype(jnp.float32), (l, c, m))

        carry = terms(jax.tree.map(lambda x: x[0], batch))
        if batch["inputs"].shape[0] > 1:
            add = lambda carry, micro: (jax.tree.map(jnp.add, carry, terms(micro)), None)  # noqa: E731
            carry, _ = jax.lax.scan(add, carry, jax.tree.map(lambda x: x[1:], batch))
        return carry

    rep = mesh_lib.replicated(mesh)
    return jax.jit(
        eval_step,
        in_shardings=(
            state_shardings["params"], state_shardings["rest"], {k: batch_sharding for k in BATCH_KEYS},
            extra_shardings(extra),
        ),
        out_shardings=rep,
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
