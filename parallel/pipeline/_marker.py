"""``mark_pipeline_boundary``: an identity that cuts pipeline stages where a forward pass calls it.

It is a primitive of its own so that it survives tracing and differentiation: its JVP marks the
tangents and its transpose marks the cotangents, so the backward pass is cut at the same places.
Compiled, it is the identity.
"""
from __future__ import annotations

from typing import Any

import jax
from jax.extend import core as jax_core
from jax.interpreters import ad, batching, mlir

MARKER_NAME = "pipeline_boundary"

boundary_p = jax_core.Primitive(MARKER_NAME)
boundary_p.multiple_results = True
boundary_p.def_impl(lambda *args: list(args))
boundary_p.def_abstract_eval(lambda *avals: list(avals))


def _transpose(cotangents, *args):
    del args
    cts = [ad.instantiate_zeros(ct) for ct in cotangents]
    return boundary_p.bind(*cts)


ad.deflinear2(boundary_p, _transpose)
batching.primitive_batchers[boundary_p] = lambda args, dims: (boundary_p.bind(*args), dims)
mlir.register_lowering(boundary_p, lambda ctx, *args: list(args))


def mark_pipeline_boundary(tree: Any) -> Any:
    """Marks the end of a pipeline stage: ``x = parallel.mark_pipeline_boundary(x)``.

    Everything the forward pass computes before the call (on the way to ``tree``) belongs to one
    stage, what follows to the next. Outside ``PipeshardParallel`` it is the identity, so a
    model keeps running unchanged under any other method.

    Args:
      tree: the activations passed to the next stage: an array or a pytree of arrays.

    Returns:
      ``tree`` unchanged.
    """
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    return jax.tree.unflatten(treedef, boundary_p.bind(*leaves))
