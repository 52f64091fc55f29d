"""Parallel methods on any state pytree: roles found from types and the traced step, not names.

The same MLP and Adam optimizer are held as (a) the Trainer's dict, (b) ``{"params", "opt"}``,
(c) a flax ``TrainState``, (d) a tuple ``(params, opt_state)`` and (e) an ``nnx.Optimizer``'s
state; every form must get the same sharding.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from jax.sharding import PartitionSpec as P

import parallel
from parallel import auto
from parallel._roles import OPTIMIZER, PARAMETER, STATE, find_roles

SIZES = (16, 64, 16)
BATCH = 32
FORMS = ("trainer", "opt_key", "train_state", "tuple")


def mlp_params(key, sizes=SIZES):
    keys = jax.random.split(key, len(sizes) - 1)
    return {f"dense_{i}": {"kernel": jax.random.normal(keys[i], (d_in, d_out)) / np.sqrt(d_in),
                           "bias": jnp.full((d_out,), 0.1, jnp.float32)}
            for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:]))}


def mlp_loss(params, batch):
    h = batch["x"]  # (B, D_0)
    for i in range(len(params)):
        layer = params[f"dense_{i}"]
        h = h @ layer["kernel"] + layer["bias"]  # (B, D_i+1)
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return jnp.mean((h - batch["y"]) ** 2)


def residual_loss(params, batch):
    h = batch["x"]  # (B, H)
    for i in range(len(params)):
        layer = params[f"block_{i}"]
        h = h + jax.nn.relu(h @ layer["w_in"]) @ layer["w_out"]  # (B, W) -> (B, H)
    return jnp.mean((h - batch["y"]) ** 2)


def make_form(form, params, loss_fn=mlp_loss, tx=None):
    """``(state, train_step)`` holding ``params`` and Adam's state as ``form``."""
    tx = tx or optax.adam(1e-2)
    grad_fn = jax.value_and_grad(loss_fn)

    def adam(params, opt_state, batch):
        loss, grads = grad_fn(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if form == "trainer":
        # model_state: a running average, updated like a batch-norm statistic
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": tx.init(params), "rng": jax.random.key(7),
                 "model_state": {"mean": jnp.zeros((), jnp.float32)}}

        def step(state, batch):
            params, opt_state, loss = adam(state["params"], state["opt_state"], batch)
            mean = 0.9 * state["model_state"]["mean"] + 0.1 * loss
            return {**state, "step": state["step"] + 1, "params": params,
                    "opt_state": opt_state, "model_state": {"mean": mean}}, {"loss": loss}
    elif form == "opt_key":
        state = {"params": params, "opt": tx.init(params)}

        def step(state, batch):
            params, opt, loss = adam(state["params"], state["opt"], batch)
            return {"params": params, "opt": opt}, {"loss": loss}
    elif form == "train_state":
        state = train_state.TrainState.create(apply_fn=loss_fn, params=params, tx=tx)

        def step(state, batch):
            loss, grads = jax.value_and_grad(state.apply_fn)(state.params, batch)
            return state.apply_gradients(grads=grads), {"loss": loss}
    else:
        state = (params, tx.init(params))

        def step(state, batch):
            params, opt_state, loss = adam(*state, batch)
            return (params, opt_state), loss
    return state, step


def loss_of(metrics):
    return metrics["loss"] if isinstance(metrics, dict) else metrics


def nnx_form(sizes=SIZES, tx=None):
    """An ``nnx.Optimizer`` over an NNX MLP, held as the pure dict of ``nnx.split``'s state."""

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                                    for a, b in zip(sizes[:-1], sizes[1:])])

        def __call__(self, x):
            for i, layer in enumerate(self.layers):
                x = layer(x)
                x = jnp.tanh(x) if i < len(self.layers) - 1 else x
            return x

    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx or optax.adam(1e-2), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        loss, grads = nnx.value_and_grad(
            lambda m: jnp.mean((m(batch["x"]) - batch["y"]) ** 2))(model)
        optimizer.update(model, grads)
        return nnx.to_pure_dict(nnx.state((model, optimizer))), {"loss": loss}

    return nnx.to_pure_dict(state), step


def build(form):
    """The small MLP with Adam held as ``form`` (one of ``FORMS`` or ``"nnx"``)."""
    return nnx_form() if form == "nnx" else make_form(form, mlp_params(jax.random.key(0)))


def make_batch(d_in=SIZES[0], d_out=SIZES[-1], batch=BATCH):
    rng = np.random.default_rng(0)
    return {"x": rng.normal(size=(batch, d_in)).astype(np.float32),
            "y": rng.normal(size=(batch, d_out)).astype(np.float32)}


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), tree)


def roles_by_path(state, step, batch):
    roles = find_roles(step, (abstract(state), abstract(batch)), batch_argnums=(1,),
                       donate_argnums=(0,))
    paths = [jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    return dict(zip(paths, roles.by_arg[0]))


@pytest.mark.parametrize("form", FORMS)
def test_roles_of_each_state_form(form):
    state, step = make_form(form, mlp_params(jax.random.key(0)))
    roles = roles_by_path(state, step, make_batch())
    prefix = {"trainer": ("['params']", "['opt_state'][0]"),
              "opt_key": ("['params']", "['opt'][0]"),
              "train_state": (".params", ".opt_state[0]"), "tuple": ("[0]", "[1][0]")}[form]
    layers = [f"['dense_{i}']['{w}']" for i in range(2) for w in ("kernel", "bias")]
    expected = {prefix[0] + leaf: PARAMETER for leaf in layers}
    expected.update({f"{prefix[1]}.{moment}{leaf}": OPTIMIZER
                     for moment in ("mu", "nu") for leaf in layers})
    expected[f"{prefix[1]}.count"] = OPTIMIZER  # inside optax's ScaleByAdamState
    others = {"trainer": ["['model_state']['mean']", "['rng']", "['step']"],
              "train_state": [".step"]}.get(form, [])
    expected.update({path: STATE for path in others})
    assert roles == expected


def test_roles_of_an_nnx_optimizer_state_without_optax_types():
    state, step = nnx_form()
    roles = roles_by_path(state, step, make_batch())
    layers = [f"['layers'][{i}]['{w}']" for i in range(2) for w in ("bias", "kernel")]
    expected = {f"[0]{leaf}": PARAMETER for leaf in layers}
    # the moments mirror the parameters; nothing else marks them once nnx made them dicts
    expected.update({f"[1]['opt_state'][0]['{moment}']{leaf}": OPTIMIZER
                     for moment in ("mu", "nu") for leaf in layers})
    expected.update({"[1]['opt_state'][0]['count']": STATE, "[1]['step']": STATE})
    assert roles == expected


def test_roles_ignore_accumulators_and_follow_nested_jit():
    # Adagrad's accumulator is updated as `acc + g**2` but does not feed the loss: optimizer
    # state (it mirrors a parameter) even where nnx left no optax type on it.
    state, step = nnx_form(tx=optax.adagrad(1e-2))
    roles = roles_by_path(state, step, make_batch())
    assert {path for path, role in roles.items() if role == PARAMETER} == {
        f"[0]['layers'][{i}]['{w}']" for i in range(2) for w in ("bias", "kernel")}
    assert {path for path, role in roles.items() if role == OPTIMIZER} == {
        f"[1]['opt_state'][0]['sum_of_squares']['layers'][{i}]['{w}']"
        for i in range(2) for w in ("bias", "kernel")}
    # a parameter update inside a jitted helper is still found
    params = mlp_params(jax.random.key(0))
    tx = optax.adagrad(1e-2)

    @jax.jit
    def apply(params, updates):
        return optax.apply_updates(params, updates)

    def step(state, batch):
        loss, grads = jax.value_and_grad(mlp_loss)(state["w"], batch)
        updates, acc = tx.update(grads, state["acc"], state["w"])
        return {"w": apply(state["w"], updates), "acc": acc}, loss

    roles = roles_by_path({"w": params, "acc": tx.init(params)}, step, make_batch())
    assert {path for path, role in roles.items() if role == PARAMETER} == {
        f"['w']['dense_{i}']['{w}']" for i in range(2) for w in ("bias", "kernel")}
    assert {role for path, role in roles.items() if path.startswith("['acc']")} == {OPTIMIZER}


def sharded_specs(plan):
    """``(shape, spec)`` of the state leaves with at least 1024 elements, sorted; and whether
    every smaller leaf is replicated."""
    big = sorted((leaf.shape, tuple(leaf.spec)) for leaf in plan.inputs[0]
                 if np.prod(leaf.shape) >= 1024)
    small_replicated = all(leaf.spec == P() for leaf in plan.inputs[0]
                           if np.prod(leaf.shape) < 1024)
    return big, small_replicated


KERNEL_0, KERNEL_1 = (16, 64), (64, 16)


@pytest.mark.parametrize("form", FORMS + ("nnx",))
def test_zero_specs_are_the_same_for_every_form(form):
    state, step = build(form)
    batch = make_batch()
    zero2 = parallel.parallelize(step, method=parallel.Zero2Parallel()).plan(state, batch)
    # parameters whole, Adam's mu and nu split on their dimension that divides by 8
    assert sharded_specs(zero2) == (sorted(
        [(KERNEL_0, ())] + [(KERNEL_0, (None, "data"))] * 2
        + [(KERNEL_1, ())] + [(KERNEL_1, ("data",))] * 2), True)
    zero3 = parallel.parallelize(step, method=parallel.Zero3Parallel()).plan(state, batch)
    assert sharded_specs(zero3) == (sorted(
        [(KERNEL_0, (None, "data"))] * 3 + [(KERNEL_1, ("data",))] * 3), True)


def test_manual_method_mirrors_parameter_specs_on_a_tuple_and_a_train_state():
    params = mlp_params(jax.random.key(0))
    names = {"dense_0": {"kernel": ("embed", "mlp"), "bias": ("mlp",)},
             "dense_1": {"kernel": ("mlp", "embed"), "bias": ("embed",)}}
    method = parallel.ManualParallel({"mlp": "model"}, mesh={"data": 4, "model": 2})
    expected = {"['dense_0']['kernel']": P(None, "model"), "['dense_0']['bias']": P("model"),
                "['dense_1']['kernel']": P("model"), "['dense_1']['bias']": P()}
    for form in ("tuple", "train_state"):
        state, step = make_form(form, params)
        if form == "tuple":
            state_names, prefixes = (names, None), ("[0]", "[1][0]")
        else:
            state_names = state.replace(step=None, params=names, opt_state=None)
            prefixes = (".params", ".opt_state[0]")
        plan = parallel.parallelize(step, method=method,
                                    logical_axes=(state_names, None)).plan(state, make_batch())
        specs = {leaf.path: leaf.spec for leaf in plan.inputs[0]}
        for leaf, spec in expected.items():
            assert specs[prefixes[0] + leaf] == spec
            assert specs[f"{prefixes[1]}.mu{leaf}"] == spec
            assert specs[f"{prefixes[1]}.nu{leaf}"] == spec


def test_a_string_leaf_is_refused_with_its_path_and_a_python_int_is_a_scalar():
    params = mlp_params(jax.random.key(0))
    state, step = make_form("opt_key", params)
    step = parallel.parallelize(step, method=parallel.Zero2Parallel())
    with pytest.raises(parallel.PlanError, match=r"args\[0\]\['name'\] is str 'run-1', not an "
                                                 r"array"):
        step.plan({**state, "name": "run-1"}, make_batch())
    with pytest.raises(parallel.PlanError, match=r"args\[0\]\['log'\] is object <object"):
        auto.solve(step.fn, ({**state, "log": object()}, make_batch()))
    # a TrainState starts with the Python int step 0: taken as an int32 scalar
    ts, ts_step = make_form("train_state", params)
    assert isinstance(ts.step, int)
    ts_step = parallel.parallelize(ts_step, method=parallel.Zero2Parallel())
    new_state, _ = ts_step(ts, make_batch())
    new_state, _ = ts_step(new_state, make_batch())  # now an int32 array: the same plan
    assert int(new_state.step) == 2 and len(ts_step._entries) == 1


def single_device_losses(form, steps=2):
    state, step = build(form)
    step = jax.jit(step)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, make_batch())
        losses.append(float(loss_of(metrics)))
    return losses


@pytest.fixture(scope="module")
def runs():
    """Two steps of each form under each method: (losses, per-device memory)."""
    methods = {"zero2": parallel.Zero2Parallel(), "zero3": parallel.Zero3Parallel(),
               # timing would pick among near-equal plans by the noise of a shared CPU
               "auto": parallel.ShardParallel(measure=False)}
    out = {}
    for form in FORMS + ("nnx",):
        for name, method in methods.items():
            state, step = build(form)
            step = parallel.parallelize(step, method=method)
            memory = step.analyze(state, make_batch()).per_device_memory_bytes
            losses = []
            for _ in range(2):
                state, metrics = step(state, make_batch())
                losses.append(float(loss_of(metrics)))
            out[form, name] = losses, memory
    return out


@pytest.mark.parametrize("method", ["zero2", "zero3", "auto"])
def test_every_form_trains_like_one_device_in_the_same_memory(runs, method):
    memories = []
    for form in FORMS + ("nnx",):
        losses, memory = runs[form, method]
        np.testing.assert_allclose(losses, single_device_losses(form), rtol=1e-5)
        memories.append(memory)
    assert max(memories) <= 1.1 * min(memories), memories


HIDDEN, WIDTH = 1024, 4096


@pytest.mark.parametrize("form", FORMS)
def test_zero3_of_a_residual_mlp_needs_under_a_seventh_of_data_parallel(form):
    # 2 residual blocks h + relu(h @ w_in[1024, 4096]) @ w_out[4096, 1024], Adam, batch 64:
    # ~67 MB of weights, 3x that with Adam's moments; abstract, nothing is allocated.
    weight = {"w_in": jax.ShapeDtypeStruct((HIDDEN, WIDTH), jnp.float32),
              "w_out": jax.ShapeDtypeStruct((WIDTH, HIDDEN), jnp.float32)}
    params = {f"block_{i}": dict(weight) for i in range(2)}
    state, step = make_form(form, params, residual_loss)
    x = jax.ShapeDtypeStruct((64, HIDDEN), jnp.float32)
    args = (abstract(state), {"x": x, "y": x})
    data, zero3 = (parallel.parallelize(step, method=method).analyze(*args).per_device_memory_bytes
                   for method in (parallel.DataParallel(), parallel.Zero3Parallel()))
    assert data >= 4 * 4 * (4 * HIDDEN * WIDTH)  # weights, gradients, mu and nu: f32, whole
    assert zero3 <= 0.15 * data


def two_layer_loss(params, batch):
    h = jax.nn.relu(batch["x"] @ params["w1"])  # (B, F)
    return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)  # (B, D) -> ()


def test_solver_flavours_split_the_same_leaves_of_every_form():
    # A large batch through a narrow MLP (data parallel shaped), priced for an H100: the 1-D
    # mesh's "update sharded" flavour splits only Adam's moments, "state sharded" all of it.
    w = jax.ShapeDtypeStruct((256, 256), jnp.float32)
    x = jax.ShapeDtypeStruct((8192, 256), jnp.float32)
    found = {}
    for form in FORMS:
        state, step = make_form(form, {"w1": w, "w2": w}, two_layer_loss)
        solution = auto.solve(step, (abstract(state), {"x": x, "y": x}), num_devices=8,
                              profile="h100")
        by_variant = {r.variant: r for r in solution.tried if r.variant}
        found[form] = {}
        for variant in ("update sharded", "state sharded"):
            result = by_variant[variant]
            specs = jax.tree.leaves(solution.with_best(result).input_specs()[0],
                                    is_leaf=lambda x: isinstance(x, P))
            shapes = [np.shape(leaf) for leaf in jax.tree.leaves(abstract(state))]
            found[form][variant] = (sorted((shape, tuple(spec)) for shape, spec
                                           in zip(shapes, specs) if len(shape) == 2),
                                    result.step_time_s)
        update, _ = found[form]["update sharded"]
        assert [spec for _, spec in update].count(()) == 2  # the two weights stay whole
        assert sum(spec != () for _, spec in update) == 4  # mu and nu of both weights split
        state_sharded, _ = found[form]["state sharded"]
        assert all(spec != () for _, spec in state_sharded)
    reference = found[FORMS[0]]
    for form in FORMS[1:]:
        for variant in reference:
            assert found[form][variant][0] == reference[variant][0]
            assert found[form][variant][1] == pytest.approx(reference[variant][1], rel=1e-6)


def test_mirrors_follow_the_parameters_subtree_across_arguments():
    # step(params, opt_state, batch), both donated; a float step counter that is also a
    # "parameter" by its update (step + 1, read by a schedule) does not hide the mirroring.
    params = mlp_params(jax.random.key(0))
    tx = optax.sgd(1e-2, momentum=0.9)

    def step(params, opt_state, counter, batch):
        loss, grads = jax.value_and_grad(mlp_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: u / (1.0 + counter), updates)
        return optax.apply_updates(params, updates), opt_state, counter + 1.0, loss

    args = (params, tx.init(params), jnp.zeros(()), make_batch())
    roles = find_roles(step, abstract(args), batch_argnums=(3,), donate_argnums=(0, 1, 2))
    assert roles.by_arg[0] == (PARAMETER,) * 4
    assert roles.by_arg[1] == (OPTIMIZER,) * 4  # optax's TraceState: by type
    assert roles.by_arg[2] == (PARAMETER,)
    from parallel._roles import mirrors
    paths = [(1, 0, "trace", f"dense_{i}", w) for i in range(2) for w in ("bias", "kernel")]
    targets = [(0, f"dense_{i}", w) for i in range(2) for w in ("bias", "kernel")] + [(2,)]
    shapes = [(64,), (16, 64), (16,), (64, 16)]
    # without types, each moment is matched to its own parameter
    assert mirrors(paths, shapes, targets, shapes + [()]) == {0: 0, 1: 1, 2: 2, 3: 3}


def test_a_checkpoint_of_another_model_names_the_parameter_whatever_the_keys():
    from parallel._checkpoint_files import first_mismatch

    def layout(width):  # {"opt": Adam state, "w": params}: "opt" flattens first
        return [["opt/0/count", [], "int32"], ["opt/0/mu/dense/kernel", [16, width], "float32"],
                ["opt/0/nu/dense/kernel", [16, width], "float32"],
                ["w/dense/kernel", [16, width], "float32"]]

    assert first_mismatch(layout(8), layout(8)) is None
    assert first_mismatch(layout(8), layout(4)) == (
        "parameter w/dense/kernel: the checkpoint has shape (16, 8), the model expects shape "
        "(16, 4)")


def test_zero_methods_say_when_they_find_nothing_to_shard(monkeypatch):
    from parallel import _methods
    monkeypatch.setattr(_methods, "_warned", set())  # each warning is given once per process
    params = mlp_params(jax.random.key(0))

    def sgd(params, batch):  # a hand-written SGD step: no optimizer state at all
        grads = jax.grad(mlp_loss)(params, batch)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    with pytest.warns(UserWarning, match="Zero2Parallel found no optimizer state in the donated"):
        plan = parallel.parallelize(sgd, method=parallel.Zero2Parallel()).plan(params, make_batch())
    assert all(leaf.spec == P() for leaf in plan.inputs[0])
    with pytest.warns(UserWarning, match="Zero3Parallel shards the stored state.*none is donated"):
        parallel.parallelize(sgd, method=parallel.Zero3Parallel(),
                             donate_argnums=()).plan(params, make_batch())
    # donated, the same step's parameters are found (p - 0.1 g) and ZeRO-3 splits the kernels
    plan = parallel.parallelize(sgd, method=parallel.Zero3Parallel()).plan(params, make_batch())
    assert sharded_specs(plan) == (sorted([(KERNEL_0, (None, "data")), (KERNEL_1, ("data",))]),
                                   True)
