"""The cluster as hosts x devices per host: collectives that cross hosts are priced on the
inter-host link, the solver keeps model parallelism inside a host when the link between hosts
is slow, and a topology that does not match the devices is refused in one line."""
import jax
import jax.numpy as jnp
import optax
import pytest

import parallel
from parallel import auto, profiles
from parallel.auto._cost import MeshModel
from parallel.mesh import count_hosts
from trainer import cli

from _auto_steps import abstract_step

H100 = profiles.get_profile("h100")


def test_collectives_inside_a_host_use_nvlink_and_across_hosts_the_slower_link():
    # 2 hosts x 8: an all-reduce of 64 MiB over all 16 devices runs as reduce-scatter and
    # all-gather inside each host (2 * 7/8 of the buffer over NVLink) plus an all-reduce of
    # each device's 1/8 across the 2 hosts (2 * 1/2 * 1/8 of it over InfiniBand).
    nbytes = 64 * 2**20
    cluster = H100.on_hosts(2, 16)
    inside = 2 * 7 / 8 * nbytes / 450e9
    across = 2 * (1 / 2) * nbytes / 8 / 45e9
    assert cluster.collective_time("all-reduce", nbytes, 16, hosts=2) == pytest.approx(
        5e-6 + 10e-6 + inside + across, rel=1e-12)
    # One host: the plain ring over NVLink.
    assert H100.collective_time("all-reduce", nbytes, 8) == pytest.approx(
        5e-6 + 2 * 7 / 8 * nbytes / 450e9, rel=1e-12)
    # A pair on two hosts: everything over InfiniBand.
    assert cluster.collective_time("all-gather", nbytes, 2, hosts=2) == pytest.approx(
        15e-6 + nbytes / 2 / 45e9, rel=1e-12)


def test_mesh_axes_know_whether_they_cross_hosts():
    cluster = H100.on_hosts(2, 16)
    # data x model = 2 x 8: each model group is one host; a data group pairs the hosts.
    mm = MeshModel(("data", "model"), (2, 8), cluster)
    assert (mm.crosses_hosts(0), mm.crosses_hosts(1)) == (True, False)
    assert mm.hosts((0, 1)) == 2
    # 8 x 2: the model pairs sit inside a host; data groups of 8 span both hosts.
    mm = MeshModel(("data", "model"), (8, 2), cluster)
    assert (mm.crosses_hosts(0), mm.crosses_hosts(1)) == (True, False)
    # 1 x 16: the model axis spans both hosts.
    assert MeshModel(("data", "model"), (1, 16), cluster).crosses_hosts(1)
    # A 4-device sub-mesh starting at device 8 lies on the second host only.
    assert MeshModel(("data", "model"), (1, 4), cluster, first_device=8).hosts((1,)) == 1
    assert MeshModel(("data", "model"), (1, 4), cluster, first_device=6).hosts((1,)) == 2


def _wide_mlp_step():
    optimizer = optax.adam(1e-3)

    def train_step(state, batch):
        def loss_fn(params):
            h = jax.nn.relu(batch["x"] @ params["w1"])  # (B, F)
            return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)

        grads = jax.grad(loss_fn)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}

    params = {"w1": jax.ShapeDtypeStruct((4096, 4096), jnp.float32),
              "w2": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}
    x = jax.ShapeDtypeStruct((1024, 4096), jnp.float32)
    return train_step, ({"params": params, "opt_state": jax.eval_shape(optimizer.init, params)},
                        {"x": x, "y": x})


def test_the_solver_keeps_model_parallelism_inside_a_host():
    # A wide MLP: model parallelism over all 16 devices when they share NVLink; on two hosts
    # whose link is 10x slower, the activations' all-reduces stay inside a host and only the
    # gradients (of half the weights' size per device) cross between hosts.
    step, args = _wide_mlp_step()
    one_host = auto.solve(step, args, num_devices=16, profile=H100)
    assert one_host.mesh_shape == {"data": 1, "model": 16}
    two_hosts = auto.solve(step, args, num_devices=16, profile=H100.on_hosts(2, 16))
    assert two_hosts.mesh_shape == {"data": 2, "model": 8}
    across = next(r for r in two_hosts.tried if r.mesh_shape["model"] == 16)
    inside = next(r for r in one_host.tried if r.mesh_shape["model"] == 16)
    assert across.comm_s > inside.comm_s and across.compute_s == inside.compute_s


def test_analyze_prices_collectives_across_hosts_on_the_inter_host_link(tiny_mlp):
    step_fn, args = tiny_mlp
    reports = {}
    for hosts in (1, 2):
        method = parallel.make_method("data", num_hosts=hosts)
        reports[hosts] = parallel.parallelize(step_fn, method=method).analyze(*args,
                                                                              profile="h100")
    one, two = reports[1], reports[2]
    assert one.collectives == two.collectives
    grads = one.collectives["all-reduce"]["payload_bytes"]  # one combined all-reduce
    cluster = H100.on_hosts(2, 8)
    extra = (cluster.collective_time("all-reduce", grads, 8, hosts=2)
             - H100.collective_time("all-reduce", grads, 8))
    assert extra > 0
    assert two.estimated_step_time_s - one.estimated_step_time_s == pytest.approx(extra,
                                                                                  rel=1e-6)


@pytest.fixture(scope="module")
def tiny_mlp():
    def train_step(params, batch):  # plain gradient descent on a linear regression
        grads = jax.grad(lambda p: jnp.mean((batch["x"] @ p - batch["y"]) ** 2))(params)
        return params - 0.01 * grads

    w = jax.ShapeDtypeStruct((512, 512), jnp.float32)
    x = jax.ShapeDtypeStruct((64, 512), jnp.float32)
    return train_step, (w, {"x": x, "y": x})


def test_count_hosts_checks_the_topology_against_the_devices():
    devices = jax.devices()
    assert count_hosts(devices) == 1
    assert count_hosts(devices, 2) == 2
    assert count_hosts(devices, 4, 2) == 4
    with pytest.raises(parallel.PlanError, match="8 devices do not split evenly over 3 hosts"):
        count_hosts(devices, 3)
    with pytest.raises(parallel.PlanError, match=r"2 hosts x 8 devices per host = 16 devices "
                                                 r"does not match the 8 devices JAX sees"):
        count_hosts(devices, 2, 8)


@pytest.mark.parametrize("overrides, message", [
    (["cluster.num_hosts=3", "train.batch_size=48"],
     "error: 8 devices do not split evenly over 3 hosts; set cluster.num_hosts to a divisor "
     "of 8"),
    (["cluster.num_hosts=2", "cluster.devices_per_host=8"],
     "error: the topology 2 hosts x 8 devices per host = 16 devices does not match the 8 "
     "devices JAX sees"),
])
def test_plan_command_refuses_a_topology_that_does_not_match(overrides, message, capsys):
    code = cli.run(lambda: print(cli.plan("tiny/mlp.yaml", overrides)))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1


@pytest.mark.parametrize("devices, layers, per_host, counts", [
    (8, 16, None, [1, 2, 4, 8]),           # one host: powers of two
    (64, 16, 8, [1, 2, 4, 8, 16]),         # 8 hosts x 8: inside a host or whole hosts
    (120, 30, 8, [1, 3, 5, 15]),           # 15 hosts x 8 (Alpa's GPT-76B): whole hosts only
    (24, 16, 8, [1, 3]),                   # 3 hosts x 8
    (120, 10, 8, [1, 3, 5]),               # no more stages than layers
])
def test_pipelines_are_searched_with_stages_inside_a_host_or_of_whole_hosts(
        devices, layers, per_host, counts):
    from parallel.auto._pipelines import stage_counts

    assert stage_counts(devices, layers, per_host) == counts


def test_memory_and_a_slow_link_between_hosts_give_one_stage_per_host():
    """3 hosts x 2 CPU devices whose stages could overlap (not one shared host), the link
    between hosts 100x slower than inside: within 90% of the fewest bytes any SPMD plan needs,
    micro-batches in one SPMD stage fit; within 70%, one stage per host, each on its host's
    two devices."""
    import dataclasses

    step, abstract = abstract_step(128)
    base = profiles.get_profile("cpu", 6, num_hosts=3)
    profile = dataclasses.replace(base, shared_host=False,
                                  inter_host_bandwidth=base.link_bandwidth / 100)
    with pytest.raises(auto.MemoryBudgetError) as error:
        auto.solve(step, abstract, num_devices=6, profile=profile, memory_budget_bytes=1.0)
    smallest = error.value.smallest_bytes
    assert smallest == 802824.0

    def chosen(fraction):
        decision = auto.search(step, abstract, num_devices=6, profile=profile,
                               memory_budget_bytes=fraction * smallest, tiny_step_s=0)
        assert decision.spmd is None and decision.pipeline.memory_bytes <= fraction * smallest
        return decision.pipeline

    one = chosen(0.9)
    assert [(s.first, s.devices, s.mesh) for s in one.stages] == [(0, 6, (3, 2))]
    assert (one.num_micro_batches, one.remat) == (16, False)
    per_host = chosen(0.7)
    assert [(s.first, s.first_device, s.devices, s.mesh, s.split_state)
            for s in per_host.stages] == [(0, 0, 2, (1, 2), False), (3, 2, 2, (1, 2), False),
                                          (4, 4, 2, (1, 2), False)]
    assert (per_host.num_micro_batches, per_host.remat) == (16, False)
