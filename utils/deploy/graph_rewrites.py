"""Rewrites of the traced graph and of the predictor's passes that keep exports clear of Paddle bugs.

* :func:`resize_as_matmul`: Paddle 3.3's oneDNN executor cannot run the
  ``bilinear_interp`` op of a PIR program (PaddlePaddle/Paddle#79749), which
  YOLACT's FPN and ProtoNet use: while tracing, the network's
  :class:`yolact.Resize` layers compute two matrix products instead; the
  results agree with the op to float rounding.
* :func:`leaky_relu_as_maximum`: paddle2onnx 2.1 loses LeakyReLU's slope (ONNX export only).
* :func:`crashing_cpu_passes`: Paddle 3.3's oneDNN conv + activation fusion
  crashes on leaky_relu; the CPU predictor of such a graph skips that pass.

Each context manager changes only the network it is given and restores it on exit.
"""
import contextlib

import paddle

from yolact import Resize


@contextlib.contextmanager
def resize_as_matmul(net):
    """While tracing for export, ``net``'s Resize layers compute bilinear resizes as two matmuls.

    See :class:`yolact.Resize`; each layer's previous mode is restored on exit.
    Nothing outside ``net`` changes.
    """
    layers = [layer for layer in net.sublayers(include_self=True) if isinstance(layer, Resize)]
    previous = [layer.as_matmul for layer in layers]
    for layer in layers:
        layer.as_matmul = True
    try:
        yield
    finally:
        for layer, value in zip(layers, previous):
            layer.as_matmul = value


class _MaximumLeakyReLU(paddle.nn.Layer):
    """LeakyReLU with a slope in [0, 1] as ``maximum(x, slope * x)``: no leaky_relu op in the graph."""

    def __init__(self, negative_slope):
        super().__init__()
        self.negative_slope = negative_slope

    def forward(self, x):
        return paddle.maximum(x, x * self.negative_slope)


@contextlib.contextmanager
def leaky_relu_as_maximum(net):
    """While tracing for ONNX, ``net``'s LeakyReLU layers are replaced by :class:`_MaximumLeakyReLU` (and back).

    paddle2onnx 2.1 reads the leaky_relu op's negative_slope, a double in
    Paddle 3.3's programs, as a float: the ONNX LeakyRelu nodes got alpha NaN
    or 0.014 instead of 0.1 (DarkNet-53: every output NaN). Max and Mul carry
    the slope as a tensor. Nothing outside ``net`` changes.
    """
    swapped = []
    for parent in net.sublayers(include_self=True):
        for name, child in parent.named_children():
            # LeakyReLU keeps its slope in a private attribute; it has no public accessor.
            if isinstance(child, paddle.nn.LeakyReLU) and 0 <= child._negative_slope <= 1:
                swapped.append((parent, name, child))
    for parent, name, child in swapped:
        setattr(parent, name, _MaximumLeakyReLU(child._negative_slope))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


# Paddle 3.3's oneDNN pass fusing conv2d + activation reads leaky_relu's
# negative_slope as a float attribute, but the op holds a double: building the
# fused op dereferences a null attribute (SIGSEGV in FusedConv2dOp::Build while
# the predictor is created). DarkNet-53's conv + BN + LeakyReLU(0.1) blocks hit
# it. Graphs with leaky_relu skip that pass only, so the other configs keep
# every fusion. Paddle runs its oneDNN CPU passes even without enable_onednn().
# The pass is listed as ``conv_activation_onednn_fuse_pass`` (its log name is
# ``conv_activation_mkldnn_fuse_pass``, which delete_pass does not match).
LEAKY_RELU_CRASHING_PASSES = ('conv_activation_onednn_fuse_pass',)


def crashing_cpu_passes(graph_path):
    """The CPU passes to delete for the graph file ``graph_path`` (see LEAKY_RELU_CRASHING_PASSES).

    Looks for the op's name in the graph file (a PIR ``.json`` or a ``.pdmodel``
    protobuf both store op names as plain text).
    """
    with open(graph_path, 'rb') as f:
        return LEAKY_RELU_CRASHING_PASSES if b'leaky_relu' in f.read() else ()
