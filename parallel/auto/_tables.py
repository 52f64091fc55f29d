"""A class of groups' strategy table on one mesh, and what the solves on one mesh share.

The many solves of one search meet the same mesh models again (a pipeline's layers are
separate programs whose groups repeat one another's; every mesh's flavours): what depends only
on a mesh model and on keys that name the work exactly is kept with the mesh model
(``on_mesh``), for as long as it lives.
"""
from __future__ import annotations

import dataclasses
import threading
import weakref

import numpy as np

from parallel.auto import _rules
from parallel.auto._cost import MeshModel, Spec

_ON_MESH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_NUMBERS: dict = {}


@dataclasses.dataclass
class Table:
    """The strategies of one class of groups on one mesh.

    Attributes:
      leaders: the leader's strategy behind each ``k``.
      specs: ``specs[local_value][k]``: the value's spec under strategy ``k``.
      compute, traffic, comm: seconds of arithmetic, memory traffic and collectives per call
        under each strategy (intra-group resharding is comm).
      req_specs: ``req_specs[r][k]``: the spec requirement ``r`` asks for (``None``: none).
    """

    leaders: list[_rules.Strategy]
    specs: list[list[Spec]]
    compute: np.ndarray
    traffic: np.ndarray
    comm: np.ndarray
    req_specs: list[list[Spec | None]]

    @property
    def size(self) -> int:
        return len(self.leaders)

    def subset(self, keep) -> Table:
        """The table with only the strategies ``keep`` (indices)."""
        return Table([self.leaders[k] for k in keep],
                     [[specs[k] for k in keep] for specs in self.specs],
                     self.compute[keep], self.traffic[keep], self.comm[keep],
                     [[specs[k] for k in keep] for specs in self.req_specs])


def on_mesh(mm: MeshModel, part: str) -> dict:
    """The dict named ``part`` kept with mesh model ``mm`` (made empty on first use)."""
    with _LOCK:
        return _ON_MESH.setdefault(mm, {}).setdefault(part, {})


def number(key) -> int:
    """A number of its own for each distinct hashable ``key``, the same for equal keys."""
    with _LOCK:
        return _NUMBERS.setdefault(key, len(_NUMBERS))
