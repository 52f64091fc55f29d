"""Autoregressive sampling for the end-of-training text sample (no KV cache: small models)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trainer._steps import forward


def generate(graphdef, state, prompt: np.ndarray, num_tokens: int, window: int,
             temperature: float, seed: int) -> np.ndarray:
    """Extends ``prompt`` (int tokens, 1-D) by ``num_tokens`` sampled tokens.

    The model always sees a fixed ``[1, window]`` array (the last ``window`` tokens, right
    padded), so one compiled function serves every position.
    """
    @jax.jit
    def next_token(params, model_state, tokens, position, key):
        model = nnx.merge(graphdef, params, model_state)
        logits, _ = forward(model, tokens[None], False)  # (1, window, V)
        return jax.random.categorical(key, logits[0, position].astype(jnp.float32) / temperature)

    out = [int(t) for t in prompt]
    key = jax.random.key(seed)
    for _ in range(num_tokens):
        context = out[-window:]
        tokens = np.zeros(window, np.int32)
        tokens[: len(context)] = context
        key, sub = jax.random.split(key)
        out.append(int(next_token(state["params"], state["model_state"], tokens, len(context) - 1, sub)))
    return np.asarray(out[len(prompt):])


# C0 and C1 control characters and DEL, but tab and newline: what a terminal would act on
# (escape sequences, carriage return, backspace, bell) rather than show.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` safe to write to a terminal: control characters other than tab and newline
    become U+FFFD (the replacement character)."""
    return _CONTROL.sub("\ufffd", text)

