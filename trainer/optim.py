"""Optimizers from config: an ``optax.chain`` of clipping, the update rule and the schedule."""
from __future__ import annotations

import jax
import optax


def learning_rate_schedule(opt, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``learning_rate``, then constant, cosine or linear decay.

    Decay ends at ``learning_rate * min_lr_ratio`` at step ``opt.decay_steps`` if set (and
    stays there), else on the last step (``total_steps``): fixing ``decay_steps`` keeps the
    schedule when a run is extended.
    """
    total_steps = opt.decay_steps or total_steps
    peak, warmup = opt.learning_rate, min(opt.warmup_steps, max(total_steps - 1, 0))
    end = peak * opt.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if opt.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif opt.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt.min_lr_ratio)
    else:
        after = optax.linear_schedule(peak, end, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params):
    """Weight decay applies to matrices and kernels, not to biases or norm scales (ndim < 2)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def build_optimizer(opt, total_steps: int) -> optax.GradientTransformation:
    """The optimizer the ``OptimizerConfig`` names, with clipping and the schedule.

    Args:
      opt: the ``OptimizerConfig``.
      total_steps: ``train.steps``, the length of the schedule unless ``opt.decay_steps`` is set.
    """
    lr = learning_rate_schedule(opt, total_steps)
    parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip else []
    if opt.name in ("adamw", "adam"):
        parts.append(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps))
    elif opt.name == "lion":
        parts.append(optax.scale_by_lion(b1=opt.b1, b2=opt.b2))
    elif opt.name == "momentum":
        parts.append(optax.trace(decay=opt.momentum))
    if opt.name != "adam" and opt.weight_decay > 0:  # adam: no decoupled decay
        parts.append(optax.add_decayed_weights(opt.weight_decay, mask=decay_mask))
    parts.append(optax.scale_by_learning_rate(lr))
    return optax.chain(*parts)
