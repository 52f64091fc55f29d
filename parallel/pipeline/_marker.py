"""``mark_pipeline_boundary``: cuts pipeline stages where a forward pass calls it.

Two forms, as Alpa's users and JaxPP's write them:

* ``parallel.mark_pipeline_boundary()``: a cut in program order. It binds a primitive with no
  operands and no results; an effect of its own keeps it through ``jit``, ``grad``, ``vmap``,
  ``scan`` and ``jax.checkpoint`` (JAX drops effect-free operations whose results are unused).
* ``x = parallel.mark_pipeline_boundary(x)``: an identity on the values that cross. Its JVP marks
  the tangents and its transpose marks the cotangents, so the backward pass is cut at the same
  places.

Compiled, both are nothing.
"""
from __future__ import annotations

from typing import Any

import jax
from jax._src import effects
from jax.extend import core as jax_core
from jax.interpreters import ad, batching, mlir

MARKER_NAME = "pipeline_boundary"
CUT_NAME = "pipeline_cut"

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


class _CutEffect(effects.Effect):
    """Marks the position of a no-argument boundary so dead-code elimination keeps it."""

    def __str__(self) -> str:
        return "PipelineCut"


_cut_effect = _CutEffect()
for _allowed in (effects.lowerable_effects, effects.control_flow_allowed_effects,
                 effects.remat_allowed_effects, effects.custom_derivatives_allowed_effects,
                 effects.partial_eval_kept_effects):
    _allowed.add_type(_CutEffect)

cut_p = jax_core.Primitive(CUT_NAME)
cut_p.multiple_results = True
cut_p.def_impl(lambda: [])
cut_p.def_effectful_abstract_eval(lambda: ([], {_cut_effect}))
ad.primitive_jvps[cut_p] = lambda primals, tangents: ([], [])
batching.primitive_batchers[cut_p] = lambda args, dims: ([], [])
mlir.register_lowering(cut_p, lambda ctx: [])

_NOTHING = object()


def mark_pipeline_boundary(tree: Any = _NOTHING) -> Any:
    """Marks the end of a pipeline stage.

    ``parallel.mark_pipeline_boundary()`` cuts the forward pass where it is called: what the
    forward pass computes before the call (in program order) belongs to one stage, what follows
    to the next. ``x = parallel.mark_pipeline_boundary(x)`` cuts by data flow instead: what
    leads to ``x`` is one stage, what reads the returned ``x`` the next. Outside
    ``PipeshardParallel`` both are the identity, so a model runs unchanged under any method.

    Args:
      tree: optional; the activations passed to the next stage: an array or a pytree of arrays.

    Returns:
      ``tree`` unchanged, or ``None`` when called without arguments.
    """
    if tree is _NOTHING:
        cut_p.bind()
        return None
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    return jax.tree.unflatten(treedef, boundary_p.bind(*leaves))
