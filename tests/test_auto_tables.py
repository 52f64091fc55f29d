"""Strategy tables, members' strategies and edge costs kept with a mesh model and shared by the
structures solved on it (parallel/auto/_tables.py): a step solved after another on the same
meshes gets exactly the plans it gets alone, with fewer tables built."""
import pytest

from parallel import auto
from parallel.auto import _search
from parallel.auto._groups import Structure
from tests.test_auto_plans import mlp_step


def _plans(step, args):
    found = auto.solve(step, args, num_devices=8, profile="h100")
    return [(r.status, r.mesh_shape, r.variant, r.step_time_s, r.compute_s, r.comm_s,
             r.memory_bytes, str(r.input_specs), str(r.output_specs), str(r.constraints))
            for r in found.tried]


def _built(monkeypatch):
    """A list that grows by one per table built."""
    built, build = [], Structure._build_table

    def counted(self, *args, **kwargs):
        built.append(1)
        return build(self, *args, **kwargs)

    monkeypatch.setattr(Structure, "_build_table", counted)
    return built


def test_a_step_solved_after_another_gets_the_plans_it_gets_alone(monkeypatch):
    first = mlp_step(batch_size=64, width=512)
    second = mlp_step(batch_size=32, width=512)  # the same parameters, half the batch
    built = _built(monkeypatch)
    _search._MESH_MODELS.clear()  # new mesh models: nothing kept
    alone = _plans(*second)
    built_alone = len(built)
    _search._MESH_MODELS.clear()
    _plans(*first)
    del built[:]
    after = _plans(*second)
    assert after == alone
    # The parameters' groups (Adam's update chains) are built once for both steps.
    assert (built_alone, len(built)) == (33, 21)
    assert alone[0][1:3] == ({"data": 1, "model": 8}, "")
    assert alone[0][3] == pytest.approx(6.335726699834163e-06, rel=1e-9)
