"""``weighted_mean(total, count)``: a loss stated as a sum over examples and a count.

A masked token mean, ``sum(loss * mask) / sum(mask)``, is not the mean of per-micro-batch means.
Stated as ``parallel.weighted_mean(total, count)`` it is ``total / count`` everywhere, and a
pipeline (which sees the operation by name) takes ``count`` over the global batch, so every
micro-batch's share of the loss and of its gradients is exact. ``count`` is a number of examples
or tokens: it is not differentiated (no gradient flows into it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
from jax.interpreters import ad, batching, mlir

WEIGHTED_MEAN_NAME = "weighted_mean"

weighted_mean_p = jax_core.Primitive(WEIGHTED_MEAN_NAME)


def _divide(total, count):
    return total / count.astype(total.dtype)


weighted_mean_p.def_impl(_divide)
weighted_mean_p.def_abstract_eval(lambda total, count: jax.core.ShapedArray(total.shape,
                                                                           total.dtype))
mlir.register_lowering(weighted_mean_p, mlir.lower_fun(_divide, multiple_results=False))


def _jvp(primals, tangents):
    total, count = primals
    total_dot, _ = tangents  # the count is not differentiated
    out = weighted_mean_p.bind(total, count)
    if type(total_dot) is ad.Zero:
        return out, ad.Zero.from_primal_value(out)
    return out, weighted_mean_p.bind(total_dot, count)


def _transpose(cotangent, total, count):
    if ad.is_undefined_primal(count):
        raise ValueError("weighted_mean is linear in its total only")
    if type(cotangent) is ad.Zero:
        return [ad.Zero(total.aval), None]
    return [weighted_mean_p.bind(cotangent, count), None]


def _batch(args, dims):
    total, count = args
    size = next(x.shape[d] for x, d in zip(args, dims) if d is not batching.not_mapped)
    total = batching.bdim_at_front(total, dims[0], size)
    count = batching.bdim_at_front(count, dims[1], size)
    count = jnp.broadcast_to(count.reshape(count.shape + (1,) * (total.ndim - count.ndim)),
                             total.shape) if count.shape != total.shape else count
    return weighted_mean_p.bind(total, count), 0


ad.primitive_jvps[weighted_mean_p] = _jvp
ad.primitive_transposes[weighted_mean_p] = _transpose
batching.primitive_batchers[weighted_mean_p] = _batch


def weighted_mean(total, count):
    """``total / count`` for a loss that is a sum over examples divided by how many there are.

    Under ``PipeshardParallel`` (and the Trainer's ``train.grad_accum_steps``) the result and its
    gradients equal the unpipelined step's, where a plain ``total / count`` over micro-batches
    would average per-micro-batch ratios.

    Args:
      total: the sum over examples (or tokens) of a per-example quantity, e.g.
        ``jnp.sum(loss * mask)``.
      count: how many examples (tokens) ``total`` sums over, e.g. ``jnp.sum(mask)``; a scalar or
        an array of ``total``'s shape. It is not differentiated. A pipeline computes it over the
        global batch, so it must depend on the batch alone (not on the model's parameters).

    Returns:
      ``total / count`` in ``total``'s dtype.
    """
    total = jnp.asarray(total)
    count = jnp.asarray(count)
    if not jnp.issubdtype(total.dtype, jnp.inexact):
        raise TypeError(f"weighted_mean: total must be floating point, got {total.dtype}")
    if count.shape not in ((), total.shape):
        raise ValueError(f"weighted_mean: count has shape {count.shape}; use a scalar or "
                         f"total's shape {total.shape}")
    return weighted_mean_p.bind(total, jax.lax.stop_gradient(count))
