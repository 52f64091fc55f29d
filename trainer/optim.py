"""Optimizers from config: an ``optax.chain`` of clipping, the update rule and the schedule."""
from __future__ import annotations

import dataclasses

import jax
import optax
from optax.contrib import MuonDimensionNumbers


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


# Logical axes of the matrices of a linear map ``x @ W`` in the models: Muon orthogonalizes over them.
MATRIX_AXES = ("embed", "mlp", "heads", "kv")


def muon_dimensions(names, ndim: int) -> MuonDimensionNumbers | None:
    """How Muon sees a parameter with logical axis ``names`` as matrices, or None (AdamW's).

    A kernel is a Muon matrix when it has an ``embed`` axis, another of ``mlp``, ``heads`` or
    ``kv``, and no ``vocab`` axis (embeddings and output heads stay on AdamW, as in the Muon
    papers). Its output axes are ``embed`` when that is the last axis (an output projection),
    else its other matrix axes (an input projection: q/k/v, the MLP's first layer); the
    remaining matrix axes are the input. Other axes (None, ``expert``) index separate matrices:
    the GPT's q, k and v, a mixture's experts. Without names, a 2-D parameter is one matrix
    (rows the input) and anything else goes to AdamW.
    """
    if names is None or not any(n is not None for n in names):  # unnamed: optax's default
        return MuonDimensionNumbers(0, 1) if ndim == 2 else None
    matrix = [i for i, n in enumerate(names) if n in MATRIX_AXES]
    if "vocab" in names or "embed" not in names or len(matrix) < 2:
        return None
    if names[-1] == "embed":
        output = (len(names) - 1,)
    else:
        output = tuple(i for i in matrix if names[i] != "embed")
    return MuonDimensionNumbers(tuple(i for i in matrix if i not in output), output)


def build_optimizer(opt, total_steps: int, param_axes=None) -> optax.GradientTransformation:
    """The optimizer the ``OptimizerConfig`` names, with clipping and the schedule.

    Args:
      opt: the ``OptimizerConfig``.
      total_steps: ``train.steps``, the length of the schedule unless ``opt.decay_steps`` is set.
      param_axes: for ``muon``: a pytree like the params holding each one's tuple of logical
        axis names (or None); which parameters are Muon matrices comes from it
        (``muon_dimensions``). None: every parameter is taken as unnamed.
    """
    lr = learning_rate_schedule(opt, total_steps)
    parts = [optax.clip_by_global_norm(opt.grad_clip)] if opt.grad_clip else []
    if opt.name == "muon":
        return optax.chain(*parts, _muon(opt, total_steps, lr, param_axes))
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


def _muon(opt, total_steps: int, lr, param_axes) -> optax.GradientTransformation:
    """``optax.contrib.muon``: Muon (Nesterov momentum ``opt.momentum``, 5 Newton-Schulz steps,
    updates scaled by ``sqrt(max(1, fan_out / fan_in))``, decoupled weight decay) on the matrices
    ``muon_dimensions`` picks, at ``learning_rate``; NAdam (``b1``, ``b2``, no weight decay) on
    everything else at ``adam_learning_rate``, on the same schedule."""
    adam_lr = opt.learning_rate if opt.adam_learning_rate is None else opt.adam_learning_rate
    adam_schedule = learning_rate_schedule(dataclasses.replace(opt, learning_rate=adam_lr),
                                           total_steps)

    is_names = lambda x: x is None or isinstance(x, tuple)
    names = {} if param_axes is None else dict(
        jax.tree_util.tree_flatten_with_path(param_axes, is_leaf=is_names)[0])

    def dimensions(params):  # optax calls it on the params and on their Muon-masked tree
        return jax.tree_util.tree_map_with_path(
            lambda path, p: muon_dimensions(names.get(path), p.ndim), params)

    return optax.contrib.muon(
        lr, beta=opt.momentum, eps=opt.eps, weight_decay=opt.weight_decay,
        adam_b1=opt.b1, adam_b2=opt.b2, adam_learning_rate=adam_schedule,
        muon_weight_dimension_numbers=dimensions)
