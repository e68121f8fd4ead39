"""The operations the generic tracer maps channels through, by kind (everything else is refused).

* elementwise: the output's channel ``c`` depends on the input's channel ``c`` only, with no
  per-channel parameter (activations, dropout, ``contiguous`` ...);
* binary: elementwise on two tensors (``+ - * /``); two channel tensors are coupled (the same
  channels must go from both), a channel tensor and a number are fine;
* pooling over the trailing spatial dimensions (the channel dimension must not be pooled);
* reductions (``mean``/``sum``/``amax``/``amin`` over given dimensions other than the channels);
* ``flatten``, ``view``/``reshape(x.size(0), -1)``, ``cat``, ``size``/``shape``: handled in the tracer.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ELEMENTWISE_MODULES", "ELEMENTWISE_FUNCTIONS", "ELEMENTWISE_METHODS", "BINARY_FUNCTIONS", "BINARY_METHODS",
           "POOL_MODULES", "POOL_FUNCTIONS", "REDUCE_FUNCTIONS", "REDUCE_METHODS", "FLATTEN", "CAT", "RESHAPE_METHODS"]

ELEMENTWISE_MODULES: frozenset[type] = frozenset({
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
})

ELEMENTWISE_FUNCTIONS: frozenset[object] = frozenset({
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.elu, F.selu, F.celu, F.leaky_relu, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.mish, F.softplus, F.softsign, F.logsigmoid, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout,
    F.dropout1d, F.dropout2d, F.dropout3d, torch.abs, torch.exp, torch.neg, operator.neg, torch.square, torch.sqrt,
    torch.rsqrt, torch.clamp, torch.clip, operator.pos,
})

ELEMENTWISE_METHODS: frozenset[str] = frozenset({
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "abs", "neg", "sqrt", "rsqrt", "square", "clamp",
    "clamp_", "clip", "contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to", "type_as",
})

BINARY_FUNCTIONS: frozenset[object] = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum,
})

BINARY_METHODS: frozenset[str] = frozenset({"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"})

# pooling over the last k dimensions: module type or function -> k
POOL_MODULES: dict[type, int] = {
    **{c: 1 for c in (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d)},
    **{c: 2 for c in (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d)},
    **{c: 3 for c in (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)},
}
POOL_FUNCTIONS: dict[object, int] = {
    F.max_pool1d: 1, F.avg_pool1d: 1, F.adaptive_avg_pool1d: 1, F.adaptive_max_pool1d: 1,
    F.max_pool2d: 2, F.avg_pool2d: 2, F.adaptive_avg_pool2d: 2, F.adaptive_max_pool2d: 2,
    F.max_pool3d: 3, F.avg_pool3d: 3, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool3d: 3,
}
ADAPTIVE = frozenset({nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                      nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d,
                      F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d})

REDUCE_FUNCTIONS: frozenset[object] = frozenset({torch.mean, torch.sum, torch.amax, torch.amin})
REDUCE_METHODS: frozenset[str] = frozenset({"mean", "sum", "amax", "amin"})
FLATTEN: frozenset[object] = frozenset({torch.flatten})
CAT: frozenset[object] = frozenset({torch.cat, torch.concat, torch.concatenate})
RESHAPE_METHODS: frozenset[str] = frozenset({"view", "reshape"})
