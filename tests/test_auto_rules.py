"""ShardParallel's building blocks on literal inputs: costs, spec mapping, strategies, the
flattened graph, liveness and the integer program."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from parallel.auto import _rules
from parallel.auto._cost import MeshModel
from parallel.auto._graph import build_graph
from parallel.auto._groups import Structure
from parallel.auto._ilp import Program
from parallel.auto._memory import Liveness
from parallel.profiles import DeviceProfile

# Round numbers: 1 TFLOP/s, 100 GB/s memory, 1 GB/s links with 1 us latency.
PROFILE = DeviceProfile("test", 1e12, 2**30, 1e11, 1e9, 1e-6)
DATA, MODEL = (0,), (1,)


@pytest.fixture
def mesh():
    return MeshModel(("data", "model"), (2, 4), PROFILE)


def test_partition_spec_names_axes_and_drops_trailing_none(mesh):
    assert mesh.partition_spec(((0, 1), (), ())) == P(("data", "model"))
    assert mesh.partition_spec(((), (1,))) == P(None, "model")
    assert mesh.partition_spec(((), ())) == P()
    assert mesh.shards(((0,), (1,))) == 8


@pytest.mark.parametrize("src,dst,seconds", [
    ((DATA, ()), ((), ()), 1e-6 + 0.5 * 8192 / 1e9),          # all-gather over data (2)
    ((DATA, ()), ((), DATA), 1e-6 + 0.5 * 4096 / 1e9),        # all-to-all over data
    (((), ()), (DATA, MODEL), 0.0),                           # slicing is free
    (((0, 1), ()), (DATA, ()), 1e-6 + 0.75 * 4096 / 1e9),     # gather model (4) of 1 KiB shards
    ((DATA, MODEL), (DATA, MODEL), 0.0),
])
def test_reshard_cost_is_alpha_beta_of_the_collective(mesh, src, dst, seconds):
    # f32[64, 32] = 8 KiB.
    assert mesh.reshard((64, 32), 4, src, dst) == pytest.approx(seconds, rel=1e-12)


def test_collectives_follow_ring_formulas(mesh):
    assert mesh.all_reduce(1000.0, (0,)) == pytest.approx(1e-6 + 2 * 0.5 * 1000 / 1e9)
    assert mesh.all_reduce(1000.0, (0, 1)) == pytest.approx(1e-6 + 2 * 7 / 8 * 1000 / 1e9)
    assert mesh.reduce_scatter(1000.0, (1,)) == pytest.approx(1e-6 + 0.75 * 1000 / 1e9)
    assert mesh.all_gather(1000.0, (1,)) == pytest.approx(1e-6 + 0.75 * 1000 / 1e9)


@pytest.mark.parametrize("src,dst,spec,out,gathered", [
    # Split heads: the hidden dim's split moves to the heads dim (16 % 4 == 0).
    ((8, 16, 64), (8, 16, 16, 4), ((), (), MODEL), ((), (), MODEL, ()), ()),
    # Merge (T, E) -> T*E keeping a split of the major dim.
    ((8, 16, 64), (8, 1024), ((), DATA, ()), ((), DATA), ()),
    # A split minor dim cannot survive the merge: it is gathered.
    ((8, 16, 64), (8, 1024), ((), (), MODEL), ((), ()), (1,)),
    # A 3-way first factor does not divide by 4: gathered.
    ((4, 96), (4, 3, 32), ((), MODEL), ((), (), ()), (1,)),
])
def test_reshape_maps_splits_through_dim_groups(mesh, src, dst, spec, out, gathered):
    assert _rules._reshape_spec(src, dst, spec, mesh) == (out, gathered)


def _eqn(fn, *args):
    graph = build_graph(jax.make_jaxpr(fn)(*args))
    return graph, graph.eqns[0]


def test_dot_strategies_enumerate_splits_and_their_collectives():
    mm = MeshModel(("data", "model"), (1, 8), PROFILE)
    graph, eqn = _eqn(jnp.dot, jax.ShapeDtypeStruct((32, 64), jnp.float32),
                      jax.ShapeDtypeStruct((64, 128), jnp.float32))
    no_batch = [frozenset()] * len(graph.values)
    found = {(s.operands, s.outputs, s.collective): s
             for s in _rules.dot_strategies(eqn, graph, mm, no_batch)}
    rep, rows, cols = ((), ()), (MODEL, ()), ((), MODEL)
    megatron = ((rep, cols), (cols,), None)
    all_reduce = ((cols, rows), (rep,), ("all-reduce", MODEL, None))
    assert set(found) == {
        ((rep, rep), (rep,), None),
        ((rows, rep), (rows,), None),
        megatron,
        all_reduce,
        ((cols, rows), (cols,), ("reduce-scatter", MODEL, 1)),  # onto the larger output dim
    }
    assert found[megatron].compute == pytest.approx(2 * 32 * 64 * 128 / 8 / 1e12)
    assert found[megatron].comm == 0
    assert found[all_reduce].comm == pytest.approx(1e-6 + 2 * 7 / 8 * 32 * 128 * 4 / 1e9)


def test_no_reduce_scatter_where_xla_has_none():
    cpu_like = DeviceProfile("cpu-like", 1e12, 2**30, 1e11, 1e9, 1e-6, native_reduce_scatter=False)
    mm = MeshModel(("data", "model"), (1, 8), cpu_like)
    graph, eqn = _eqn(jnp.dot, jax.ShapeDtypeStruct((32, 64), jnp.float32),
                      jax.ShapeDtypeStruct((64, 128), jnp.float32))
    no_batch = [frozenset()] * len(graph.values)
    kinds = sorted(str(s.collective) for s in _rules.dot_strategies(eqn, graph, mm, no_batch))
    assert kinds == ["('all-reduce', (1,), None)", "None", "None", "None"]


def test_reduction_over_a_split_dim_all_reduces(mesh):
    graph, eqn = _eqn(lambda x: x.sum(1), jax.ShapeDtypeStruct((16, 64), jnp.float32))
    st = _rules.follow(eqn, graph, 0, (DATA, MODEL), mesh)
    assert st.outputs == ((DATA,),)
    # Output f32[16] split over data: 32 bytes per device, all-reduced over model (4).
    assert st.comm == pytest.approx(1e-6 + 2 * 0.75 * 32 / 1e9)


def test_graph_inlines_calls_and_weights_loop_bodies():
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.cos(x),))

    def step(x, w):
        def body(c, wi):
            return jnp.tanh(c @ wi), c.sum()

        c, ys = jax.lax.scan(body, f(x), w)  # 3 iterations
        return jax.lax.cond(ys.sum() > 0, lambda a: a * 2.0, lambda a: a + 1.0, c)

    graph = build_graph(jax.make_jaxpr(step)(jnp.ones((2, 4)), jnp.ones((3, 4, 4))))
    by_prim = {}
    for e in graph.eqns:
        by_prim.setdefault(e.prim, []).append(e)
    assert [e.weight for e in by_prim["dot_general"]] == [3.0]
    assert [e.weight for e in by_prim["tanh"]] == [3.0]
    assert "sin" in by_prim and "custom_vjp_call" not in by_prim and "scan" not in by_prim
    assert [graph.values[e.outputs[0]].shape for e in by_prim["_slice_leading"]] == [(4, 4)]
    assert len(by_prim["_merge"]) == 1 and len(graph.loops) == 1
    assert graph.loops[0][2] == 3.0
    # Top-level equations are addressable for sharding constraints; loop bodies are not.
    assert by_prim["sin"][0].site is not None and by_prim["dot_general"][0].site is None


def test_liveness_counts_kept_arrays_while_each_equation_runs():
    def fn(x, w):
        h = x @ w          # 0: f32[4, 8] = 128 bytes
        a = jnp.tanh(h)    # 1: fused, not kept
        return a @ w.T     # 2: transpose (read by a dot, so kept), 3: f32[4, 8] (a is kept too)

    graph = build_graph(jax.make_jaxpr(fn)(jnp.ones((4, 8)), jnp.ones((8, 8))))
    assert [e.prim for e in graph.eqns] == ["dot_general", "tanh", "transpose", "dot_general"]
    live = Liveness(graph, donated={graph.inputs[0]}, fused=_rules.FOLLOWERS)
    sizes = np.array([v.nbytes for v in graph.values], float)
    # x (128) dies after eqn 0; w (256) is not donated; wT (256) is read by the dot.
    np.testing.assert_allclose(live.profile(sizes), [128 + 256 + 128,
                                                     256 + 128 + 128,
                                                     256 + 128 + 256,
                                                     256 + 128 + 256 + 128])


def test_product_costs_are_linearized_exactly():
    prog = Program()
    a = prog.add_choice(np.array([0.0, 1.0]))
    b = prog.add_choice(np.array([0.5, 0.0]))
    # Mismatched choices cost 10, matching ones nothing.
    prog.add_product([a[:1], a[1:]], [b[:1], b[1:]], np.array([[0.0, 10.0], [10.0, 0.0]]))
    result = prog.solve(10.0)
    assert result.status == "optimal"
    np.testing.assert_allclose(result.x[a], [1, 0])
    np.testing.assert_allclose(result.x[b], [1, 0])
    assert result.objective == pytest.approx(0.5)


def test_repeated_layers_share_one_class():
    # Layers a few hops from either end look alike to the Weisfeiler-Lehman refinement, so past
    # a dozen layers the integer program stops growing.
    def layer_stack(num_layers):
        def fn(x, ws):
            for w in ws:
                x = x + jnp.tanh(x @ w)
            return (x ** 2).sum()

        return build_graph(jax.make_jaxpr(jax.grad(fn, argnums=1))(
            jnp.ones((8, 16)), [jnp.ones((16, 16))] * num_layers))

    small, large = Structure(layer_stack(12), []), Structure(layer_stack(24), [])
    assert len(large.groups) > len(small.groups)
    assert large.num_classes == small.num_classes
