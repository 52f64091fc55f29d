"""Pure-JAX models for the pipeline tests: a small GPT (optionally cut by hand with
``mark_pipeline_boundary``) and a stack of dense layers of different widths, each with a train
step over a state whose keys are not the Trainer's."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import parallel

# Fixed CPU-like figures, so that the stages and intra-op plans chosen in tests do not depend on
# the load of the machine (the "cpu" profile is measured when first used).
PROFILE = parallel.DeviceProfile(
    name="cpu-like", peak_flops=2e10, memory_bytes=2**32, memory_bandwidth=6e9,
    link_bandwidth=6e9, link_latency_s=2e-5, native_reduce_scatter=False, overlaps_memory=False)
VOCAB, SEQ, WIDTH, DEPTH = 32, 8, 16, 4


def gpt_init(key, width: int = WIDTH):
    keys = jax.random.split(key, 2 + DEPTH)

    def normal(k, i, shape):
        return jax.random.normal(jax.random.fold_in(k, i), shape) * 0.1

    blocks = [{"qkv": normal(k, 0, (width, 3 * width)), "out": normal(k, 1, (width, width)),
               "up": normal(k, 2, (width, 4 * width)), "down": normal(k, 3, (4 * width, width)),
               "scale": jnp.ones((width,))} for k in keys[2:]]
    return {"embed": normal(keys[0], 0, (VOCAB, width)), "pos": normal(keys[1], 0, (SEQ, width)),
            "blocks": blocks}


def _norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


def _block(p, x):  # x: (B, T, C)
    q, k, v = jnp.split(_norm(x, p["scale"]) @ p["qkv"], 3, -1)
    att = jnp.einsum("btc,bsc->bts", q, k) / np.sqrt(x.shape[-1])
    att = jnp.where(jnp.tril(jnp.ones((SEQ, SEQ), bool)), att, -1e9)
    x = x + jax.nn.softmax(att) @ v @ p["out"]
    return x + jax.nn.gelu(_norm(x, p["scale"]) @ p["up"]) @ p["down"]


def gpt_loss(weights, batch, markers: bool):
    x = weights["embed"][batch["tokens"]] + weights["pos"]
    for i, p in enumerate(weights["blocks"]):
        x = _block(p, x)
        if markers and i < DEPTH - 1:
            x = parallel.mark_pipeline_boundary(x)
    logits = x @ weights["embed"].T  # tied embedding: used by the first and the last stage
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))


def gpt_step(markers: bool):
    def step(state, batch):
        loss, grads = jax.value_and_grad(gpt_loss)(state["weights"], batch, markers)
        updates, moments = OPTIMIZER.update(grads, state["moments"], state["weights"])
        new_state = {"weights": optax.apply_updates(state["weights"], updates),
                     "moments": moments, "count": state["count"] + 1}
        return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step


def gpt_state(key, width: int = WIDTH):
    weights = gpt_init(key, width)
    return {"weights": weights, "moments": OPTIMIZER.init(weights),
            "count": jnp.zeros((), jnp.int32)}


def gpt_batches(num: int = 3, size: int = 16):
    rng = np.random.default_rng(0)
    return [{"tokens": rng.integers(0, VOCAB, (size, SEQ)),
             "labels": rng.integers(0, VOCAB, (size, SEQ))} for _ in range(num)]


# A stack of dense residual layers of different widths (Wide-ResNet-like: the two wide layers
# hold most of the FLOPs), cut after every layer by hand.
WIDE_IN = 32
WIDTHS = (32, 32, 32, 32, 512, 512, 32, 32)


def wide_init(key):
    return [{"up": jax.random.normal(jax.random.fold_in(key, i), (WIDE_IN, w)) * 0.1,
             "down": jax.random.normal(jax.random.fold_in(key, 100 + i), (w, WIDE_IN)) * 0.1}
            for i, w in enumerate(WIDTHS)]


def wide_loss(layers, batch):
    x = batch["x"]  # (B, 32)
    for i, p in enumerate(layers):
        x = x + jnp.tanh(x @ p["up"]) @ p["down"]
        if i < len(layers) - 1:
            x = parallel.mark_pipeline_boundary(x)
    return jnp.mean((x - batch["y"]) ** 2)


SGD = optax.sgd(0.1)


def wide_step(state, batch):
    params, opt_state = state
    loss, grads = jax.value_and_grad(wide_loss)(params, batch)
    updates, opt_state = SGD.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), {"loss": loss}


def wide_state(key):
    params = wide_init(key)
    return (params, SGD.init(params))


def wide_batches(num: int = 3, size: int = 64):
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(size, WIDE_IN)).astype(np.float32),
             "y": rng.normal(size=(size, WIDE_IN)).astype(np.float32)} for _ in range(num)]
