"""The planner's second micro-batch count: the micro-batch program rescaled from the first one's
(no second trace of the step) is the program a trace gives, operation for operation.

A 2-layer GPT from the model registry on 8 simulated CPU devices, abstract shapes: 32 sequences
as 2 micro-batches of 16, rescaled to 4 of 8 and 8 of 4.
"""
import numpy as np
import pytest

from parallel.auto import _layers
from parallel.auto._layers import global_trace, pipeline_program
from trainer import Trainer, load_config

OVERRIDES = ["parallel.method=data", "model.num_layers=2", "model.hidden_size=64",
             "model.num_heads=4", "model.vocab_size=256", "model.block_size=32",
             "data.seq_len=32", "train.batch_size=32"]


@pytest.fixture(scope="module")
def step():
    trainer = Trainer(load_config("benchmarks/gpt-39b.yaml", OVERRIDES)).build()
    abstract = (trainer.abstract_state, trainer.batch_spec)
    return trainer.fns.train_step, abstract, global_trace(trainer.fns.train_step, abstract)


def _literal(x):
    return x if isinstance(x, int) else ("literal", np.asarray(x.val).tolist(), str(x.aval))


@pytest.mark.parametrize("num_micro_batches", [4, 8])
def test_a_rescaled_program_is_the_traced_one(step, num_micro_batches, monkeypatch):
    fn, abstract, whole = step
    first = pipeline_program(fn, abstract, (1,), (0,), 2, 4, whole)
    traced = pipeline_program(fn, abstract, (1,), (0,), num_micro_batches, 4, whole)

    def no_trace(*args, **kwargs):
        raise AssertionError("traced again")

    monkeypatch.setattr(_layers, "trace_step", no_trace)
    rescaled = pipeline_program(fn, abstract, (1,), (0,), num_micro_batches, 4, whole,
                                like=first)
    assert rescaled.micro_batch == traced.micro_batch == 32 // num_micro_batches
    a, b = traced.traced.micro, rescaled.traced.micro
    assert len(a.ops) == len(b.ops) > 1000
    assert [(str(x.shape), str(x.dtype)) for x in a.avals] == \
        [(str(x.shape), str(x.dtype)) for x in b.avals]
    for x, y in zip(a.ops, b.ops):
        assert (x.prim, x.outputs, str(x.params), [_literal(i) for i in x.inputs]) == \
            (y.prim, y.outputs, str(y.params), [_literal(i) for i in y.inputs])
    # What the search reads of it.
    assert rescaled.signatures == traced.signatures
    assert rescaled.residuals == traced.residuals
    assert rescaled.layer_state == traced.layer_state
    assert [rescaled.cut_bytes(k) for k in range(rescaled.num_layers)] == \
        [traced.cut_bytes(k) for k in range(traced.num_layers)]
