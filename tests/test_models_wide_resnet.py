"""Wide-ResNet: batch norm on known numbers, block layout, parameter and FLOP counts."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from models import wide_resnet

TINY = dict(depth=14, base_channels=4, width_factor=2, num_classes=5, image_size=16)


def test_batch_norm_train_and_eval_numbers():
    config = models.make_config("wide_resnet", dict(TINY, bn_momentum=0.9, bn_epsilon=1e-12))
    bn = wide_resnet.BatchNorm(2, config, nnx.Rngs(0))
    bn.scale[...], bn.bias[...] = jnp.array([2.0, 1.0]), jnp.array([0.0, 10.0])
    # channel 0 holds 1, 3 (mean 2, var 1); channel 1 holds 0, 4 (mean 2, var 4)
    x = jnp.array([[[[1.0, 0.0]]], [[[3.0, 4.0]]]])  # (B=2, H=1, W=1, C=2)
    y = bn(x, train=True)
    np.testing.assert_allclose(y[:, 0, 0], [[-2.0, 9.0], [2.0, 11.0]], rtol=1e-6)
    # running stats: 0.9 * (0, 0) + 0.1 * (2, 2) and 0.9 * (1, 1) + 0.1 * (1, 4)
    np.testing.assert_allclose(bn.mean[...], [0.2, 0.2], rtol=1e-6)
    np.testing.assert_allclose(bn.var[...], [1.0, 1.3], rtol=1e-6)
    # eval: (x - 0.2) / sqrt(var) * scale + bias
    np.testing.assert_allclose(bn(x, train=False)[:, 0, 0],
                               [[1.6, 10 - 0.2 / np.sqrt(1.3)], [5.6, 10 + 3.8 / np.sqrt(1.3)]], rtol=1e-5)


def test_tiny_model_layout_and_count():
    # depth 14: one bottleneck block per stage; f = 4, 8, 16, 32, widened 3x3 = 2f, out = 4f.
    #   stem 7*7*3*4 + bn 8 = 596
    #   stage 0 (c_in 4, f 4):   1x1 16+8, 3x3 9*4*8=288+16, 1x1 8*16=128+32, proj 4*16=64+32  = 584
    #   stage 1 (c_in 16, f 8):  128+16, 9*8*16=1152+32, 16*32=512+64, proj 16*32=512+64         = 2480
    #   stage 2 (c_in 32, f 16): 512+32, 9*16*32=4608+64, 32*64=2048+128, proj 32*64=2048+128    = 9568
    #   stage 3 (c_in 64, f 32): 2048+64, 9*32*64=18432+128, 64*128=8192+256, proj 64*128=8192+256 = 37568
    #   head 128*5 + 5 = 645                               total 596+584+2480+9568+37568+645 = 51441
    model = nnx.eval_shape(lambda: models.create_model("wide_resnet", TINY, rngs=nnx.Rngs(0)))  # abstract
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == 51441
    assert wide_resnet.num_params(models.make_config("wide_resnet", TINY)) == 51441
    assert [b.conv2.kernel.shape for b in model.blocks] == [(3, 3, 4, 8), (3, 3, 8, 16), (3, 3, 16, 32), (3, 3, 32, 64)]
    graphdef, state = nnx.split(model)
    logits, aux = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).forward(x), state,
                                 jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32))
    assert logits.shape == (2, 5) and aux == {}
    names = nnx.to_pure_dict(jax.tree.map(lambda v: v.replace(v.get_metadata()["out_sharding"]),
                                          nnx.state(model, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)))
    assert names["stem"] == {"kernel": (None, None, "conv_in", "conv_out")}
    assert names["blocks"][0]["bn1"] == {"scale": ("conv_out",), "bias": ("conv_out",)}
    assert names["head_kernel"] == ("embed", "classes") and names["head_bias"] == ("classes",)
    assert set(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))["stem_bn"]) == {"mean", "var"}


def valid_taps(size: int, kernel: int, stride: int) -> int:
    """Kernel taps that land inside a ``size`` x ``size`` image, summed over output pixels
    (symmetric padding (kernel - 1) // 2): XLA counts only these, not taps on padding."""
    pad = (kernel - 1) // 2
    outputs = (size + 2 * pad - kernel) // stride + 1
    per_dim = sum(1 for o in range(outputs) for k in range(kernel) if 0 <= o * stride - pad + k < size)
    return per_dim * per_dim


def test_flops_are_xla_training_count():
    # Convolutions of the tiny model on a 16x16 image: (input size, kernel, stride, c_in, c_out).
    # After the stem (16 -> 8) and the max pool (8 -> 4), stages run at 4, 2, 1, 1 pixels.
    convs = [(16, 7, 2, 3, 4)]
    for size, stride, c_in, f in [(4, 1, 4, 4), (4, 2, 16, 8), (2, 2, 32, 16), (1, 2, 64, 32)]:
        out = (size - 1) // stride + 1
        convs += [(size, 1, 1, c_in, f), (size, 3, stride, f, 2 * f), (out, 1, 1, 2 * f, 4 * f),
                  (size, 1, stride, c_in, 4 * f)]
    forward = [2 * valid_taps(size, k, s) * c_in * c_out for size, k, s, c_in, c_out in convs]
    # Training: forward, kernel gradients and input gradients each cost the forward's FLOPs,
    # except that the image needs no gradient; plus the 128x5 head three times.
    expected = 3 * sum(forward) - forward[0] + 3 * 2 * 128 * 5
    flops = models.get_spec("wide_resnet").flops_per_example(models.make_config("wide_resnet", TINY), None)
    assert expected <= flops <= 1.2 * expected, (flops, expected)  # + norms, relus, pooling (~15%)
