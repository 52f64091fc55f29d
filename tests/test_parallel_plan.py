"""Plans: exact PartitionSpecs per method, JSON, the table, sharded init, and bad input."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import parallel
from _parallel_setups import gpt_setup, mlp_setup
from parallel._roles import trace
from parallel.mesh import resolve_mesh_shape


@pytest.fixture(scope="module")
def mlp():
    return mlp_setup(sizes=(16, 64, 16), batch_size=32)


def specs_by_path(plan, argnum=0):
    return {leaf.path: leaf.spec for leaf in plan.inputs[argnum]}


def abstract_state(setup):
    return jax.eval_shape(setup.init, jax.random.key(0))


def plan_for(setup, method, logical_axes=None):
    step = parallel.parallelize(setup.train_step, method=method, logical_axes=logical_axes)
    return step.plan(abstract_state(setup), setup.batch)


MLP_LEAVES = ["['params']['dense_0']['kernel']", "['params']['dense_0']['bias']",
              "['params']['dense_1']['kernel']", "['params']['dense_1']['bias']"]
OPT = "['opt_state'][0].{}['dense_{}']['{}']"


@pytest.mark.parametrize("method, kernel_0, kernel_1, params_sharded", [
    (parallel.DataParallel(), P(), P(), False),
    (parallel.Zero2Parallel(), P(None, "data"), P("data"), False),
    (parallel.Zero3Parallel(), P(None, "data"), P("data"), True),
])
def test_data_and_zero_specs(mlp, method, kernel_0, kernel_1, params_sharded):
    plan = plan_for(mlp, method)
    assert plan.mesh_shape == {"data": 8}
    specs = specs_by_path(plan)
    for moment in ("mu", "nu"):
        assert specs[OPT.format(moment, 0, "kernel")] == kernel_0  # [16, 64]: 64 splits 8 ways
        assert specs[OPT.format(moment, 1, "kernel")] == kernel_1  # [64, 16]
        # biases (64 and 16 elements) are below min_shard_elements=1024: replicated
        assert specs[OPT.format(moment, 0, "bias")] == P()
        assert specs[OPT.format(moment, 1, "bias")] == P()
    assert specs["['params']['dense_0']['kernel']"] == (kernel_0 if params_sharded else P())
    assert specs["['params']['dense_1']['kernel']"] == (kernel_1 if params_sharded else P())
    for path in ("['params']['dense_0']['bias']", "['step']", "['rng']",
                 "['opt_state'][0].count"):
        assert specs[path] == P()
    assert specs_by_path(plan, 1) == {"['x']": P("data"), "['y']": P("data")}
    # the new state comes back where it went in; the loss metric is replicated
    outputs = {leaf.path: leaf.spec for leaf in plan.outputs}
    assert outputs["[0]['params']['dense_0']['kernel']"] == specs["['params']['dense_0']['kernel']"]
    assert outputs["[1]['loss']"] == P()


def test_manual_megatron_specs_on_gpt():
    setup = gpt_setup()
    method = parallel.ManualParallel(parallel.MEGATRON_RULES, mesh={"data": 2, "model": 4})
    plan = plan_for(setup, method, logical_axes=(setup.logical_axes, None))
    assert plan.mesh_shape == {"data": 2, "model": 4}
    specs = specs_by_path(plan)
    block = "['blocks'][0]"
    expected = {
        "['wte']": P("model"),                                        # (vocab, embed)
        "['wpe']": P(),                                               # (None, embed)
        f"{block}['attn']['qkv_kernel']": P(None, None, "model"),     # (embed, None, heads, kv)
        f"{block}['attn']['out_kernel']": P("model"),                 # (heads, kv, embed)
        f"{block}['ffn']['fc_kernel']": P(None, "model"),             # (embed, mlp)
        f"{block}['ffn']['proj_kernel']": P("model"),                 # (mlp, embed)
        f"{block}['ln_1']['scale']": P(),
        f"{block}['ln_2']['scale']": P(),
        "['ln_f']['scale']": P(),
    }
    params = {path[len("['params']"):]: spec for path, spec in specs.items()
              if path.startswith("['params']")}
    assert params == expected
    for moment in ("mu", "nu"):  # optimizer state mirrors its parameter
        for path, spec in expected.items():
            assert specs[f"['opt_state'][0].{moment}{path}"] == spec
    assert specs_by_path(plan, 1) == {"['inputs']": P("data"), "['targets']": P("data")}


def test_manual_rules_on_mlp_and_default_mesh(mlp):
    method = parallel.ManualParallel({"mlp": "model"})
    plan = plan_for(mlp, method, logical_axes=(mlp.logical_axes, None))
    assert plan.mesh_shape == {"data": 4, "model": 2}  # default: model = largest divisor <= sqrt(8)
    specs = specs_by_path(plan)
    assert [specs[p] for p in MLP_LEAVES] == [P(None, "model"), P("model"), P("model"), P()]
    assert specs[OPT.format("mu", 0, "bias")] == P("model")


def test_rule_dimension_not_dividing_warns_then_strict_refuses():
    setup = mlp_setup(sizes=(16, 12, 16), batch_size=8)
    axes = (setup.logical_axes, None)
    with pytest.warns(UserWarning, match=r"dimension 1 \('mlp', size 12\) of "
                                         r"\['params'\]\['dense_0'\]\['kernel'\] does not divide "
                                         r"by mesh axes \('model',\) of size 8"):
        plan = plan_for(setup, parallel.ManualParallel({"mlp": "model"}, mesh={"model": 8}), axes)
    assert specs_by_path(plan)["['params']['dense_0']['kernel']"] == P()
    assert specs_by_path(plan, 1)["['x']"] == P()  # no data axis: batch replicated
    strict = parallel.ManualParallel({"mlp": "model"}, mesh={"model": 8}, strict=True)
    with pytest.raises(parallel.PlanError, match="size 12.*strict=True"):
        plan_for(setup, strict, axes)


def test_plan_json_round_trip(mlp):
    plan = plan_for(mlp, parallel.Zero3Parallel())
    text = plan.to_json()
    restored = parallel.Plan.from_json(text)
    assert restored == plan
    assert restored.input_specs((abstract_state(mlp), mlp.batch)) == plan.input_specs(
        (abstract_state(mlp), mlp.batch))
    assert restored.matches((abstract_state(mlp), mlp.batch))
    assert not restored.matches((abstract_state(mlp), {"x": mlp.batch["x"][:8], "y": mlp.batch["y"]}))
    assert not restored.matches((abstract_state(mlp), {"x": mlp.batch["x"]}))
    with_constraint = dataclasses.replace(
        plan, constraints=(parallel.Constraint(3, 0, P(None, ("data",))),), extras={"k": [1]})
    assert parallel.Plan.from_json(with_constraint.to_json()) == with_constraint


def test_format_table_lists_each_leaf(mlp):
    step = parallel.parallelize(mlp.train_step, method=parallel.Zero3Parallel())
    table = parallel.format_plan(step.plan(abstract_state(mlp), mlp.batch))
    lines = table.splitlines()
    assert lines[0] == "plan: method=zero3 mesh=(data=8) devices=8"
    row = next(line for line in lines if "['params']['dense_0']['kernel']" in line).split()
    # argument, path, shape, dtype, spec, bytes per device (16 * 64 * 4 / 8)
    assert row == ["0", "['params']['dense_0']['kernel']", "16x64", "float32", "P(None,",
                   "'data')", "512"]


def test_init_state_is_created_with_the_plan_shardings(mlp):
    step = parallel.parallelize(mlp.train_step, method=parallel.Zero3Parallel())
    state = step.init_state(mlp.init, jax.random.key(0), mlp.batch)
    kernel = state["params"]["dense_0"]["kernel"]
    assert kernel.sharding.spec == P(None, "data")
    assert kernel.addressable_shards[0].data.shape == (16, 8)
    assert state["opt_state"][0].mu["dense_1"]["kernel"].sharding.spec == P("data")
    reference = mlp.init(jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, state["params"], reference["params"])
    # the checkpoint-restore target: abstract leaves carrying the same shardings
    target = step.abstract_inputs(abstract_state(mlp), mlp.batch)[0]
    assert target["params"]["dense_0"]["kernel"].sharding == kernel.sharding
    assert target["params"]["dense_0"]["kernel"].shape == (16, 64)


def test_new_structure_or_shapes_are_planned_again(mlp):
    def train_step(state, batch):  # keeps any extra state entries as they are
        new_state, metrics = mlp.train_step(state, batch)
        return dict(state, **new_state), metrics

    def state():  # a fresh one per call: the step donates (deletes) the state it is given
        return mlp.init(jax.random.key(0))

    def extra():
        return dict(state(), model_state={"count": jnp.ones((), jnp.int32)})

    step = parallel.parallelize(train_step, method=parallel.Zero2Parallel())
    half = {k: v[:16] for k, v in mlp.batch.items()}
    for make_state, batch in ((state, mlp.batch), (state, half), (extra, mlp.batch)):
        _, metrics = step(make_state(), batch)  # a new signature is planned afresh
        _, expected = jax.jit(train_step)(make_state(), batch)
        np.testing.assert_allclose(metrics["loss"], expected["loss"], rtol=1e-6)
    specs = step.plan(extra(), mlp.batch).input_specs((extra(), mlp.batch))
    assert specs[0]["model_state"] == {"count": P()}
    assert specs[1] == {"x": P("data"), "y": P("data")}


def test_constraints_on_intermediates_reach_the_compiled_step():
    def fn(w, x):
        return jnp.tanh(x @ w).sum(axis=0)  # (B, H) -> (H,)

    class ConstrainedData(parallel.DataParallel):
        def make_plan(self, fn, abstract_args, **kwargs):
            plan = super().make_plan(fn, abstract_args, **kwargs)
            jaxpr = trace(fn, tuple(abstract_args))[0].jaxpr
            dot = next(i for i, e in enumerate(jaxpr.eqns) if e.primitive.name == "dot_general")
            return dataclasses.replace(plan, constraints=(parallel.Constraint(dot, 0,
                                                                              P(None, "data")),))

    w = np.linspace(-1, 1, 16 * 32, dtype=np.float32).reshape(16, 32)
    x = np.linspace(-2, 2, 8 * 16, dtype=np.float32).reshape(8, 16)
    plain = parallel.parallelize(fn, method=parallel.DataParallel(), donate_argnums=())
    constrained = parallel.parallelize(fn, method=ConstrainedData(), donate_argnums=())
    assert "sharding_constraint" not in plain.lower(w, x).as_text()
    lowered = constrained.lower(w, x).as_text()
    assert "sharding_constraint" in lowered and '[{}, {"data"}]' in lowered
    np.testing.assert_allclose(constrained(w, x), np.tanh(x @ w).sum(0), rtol=1e-5)

    class MissingEquation(parallel.DataParallel):
        def make_plan(self, fn, abstract_args, **kwargs):
            plan = super().make_plan(fn, abstract_args, **kwargs)
            return dataclasses.replace(plan, constraints=(parallel.Constraint(999, 0, P()),))

    with pytest.raises(parallel.PlanError, match="equation 999"):
        parallel.parallelize(fn, method=MissingEquation(), donate_argnums=())(w, x)


def test_mesh_shapes():
    assert resolve_mesh_shape(None, 8) == {"data": 8}
    assert resolve_mesh_shape({"data": -1, "model": 2}, 8) == {"data": 4, "model": 2}
    assert list(resolve_mesh_shape({"model": 2, "data": -1}, 8)) == ["model", "data"]
    with pytest.raises(parallel.PlanError, match=r"mesh \{'data': 3\} has 3 devices but 8"):
        resolve_mesh_shape({"data": 3}, 8)
    with pytest.raises(parallel.PlanError, match="multiply to 3, which does not divide the 8"):
        resolve_mesh_shape({"data": -1, "model": 3}, 8)
    with pytest.raises(parallel.PlanError, match="only one mesh axis may be -1"):
        resolve_mesh_shape({"data": -1, "model": -1}, 8)
    mesh = parallel.make_mesh({"data": 2, "model": -1})
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2


def test_bad_input_errors_name_values_and_fix(mlp):
    state = abstract_state(mlp)
    odd = {k: jax.ShapeDtypeStruct((12, *v.shape[1:]), jnp.float32) for k, v in mlp.batch.items()}
    step = parallel.parallelize(mlp.train_step, method=parallel.DataParallel())
    with pytest.raises(parallel.PlanError, match=r"global batch size 12 .* not divisible by the "
                                                 r"data-parallel size 8"):
        step.plan(state, odd)
    with pytest.raises(parallel.PlanError, match="mesh axis 'model' .* not used by DataParallel"):
        plan_for(mlp, parallel.DataParallel(mesh={"data": 2, "model": 4}))
    with pytest.raises(parallel.PlanError, match="'modle'.*did you mean 'model'"):
        plan_for(mlp, parallel.ManualParallel({"mlp": "model"}, mesh={"data": 2, "modle": 4}),
                 (mlp.logical_axes, None))
    with pytest.raises(parallel.PlanError, match=r"map to mesh axes \['model'\] that mesh"):
        plan_for(mlp, parallel.ManualParallel({"mlp": "model"}, mesh={"data": 8}),
                 (mlp.logical_axes, None))
    wrong_rank = {"params": {"dense_0": {"kernel": ("mlp",)}}}
    with pytest.raises(parallel.PlanError, match=r"shape \(16, 64\) \(2 dims\) but logical axes"):
        plan_for(mlp, parallel.ManualParallel({"mlp": "model"}, mesh={"data": 2, "model": 4}),
                 (wrong_rank, None))
    with pytest.raises(parallel.PlanError, match="unknown parallel method 'dta'.*'data'"):
        parallel.make_method("dta")
    with pytest.raises(parallel.PlanError, match="only applies to method 'manual'"):
        parallel.make_method("zero2", rules={"mlp": "model"})
    assert isinstance(parallel.make_method("zero3", mesh={"data": -1}), parallel.Zero3Parallel)
    manual = parallel.make_method("manual", mesh={"data": 2, "model": 4}, rules={"mlp": "model"})
    assert manual.rules == {"mlp": "model"} and manual.mesh == {"data": 2, "model": 4}
