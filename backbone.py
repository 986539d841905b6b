"""Backbones: Bottleneck ResNet (optionally with DCNv2 blocks, YOLACT++) and DarkNet-53.

Every backbone maps an image batch [B, 3, H, W] to a list with one feature map
per stage, [B, channels[i], H / 2**(i+2), W / 2**(i+2)] for ResNet (strides 4,
8, 16, 32) and [B, channels[i], H / 2**(i+1), W / 2**(i+1)] for DarkNet-53
(strides 2 to 32). Parameter names are the reference's (``layers.i.j.conv1``,
``downsample.0``, ``conv2.conv_offset_mask`` ...), so converted reference
checkpoints load by name.
"""
import math

import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from paddle.vision.ops import deform_conv2d


class Conv2D(nn.Conv2D):
    """nn.Conv2D (same parameters, same forward) plus :meth:`convolve`, its convolution with another kernel.

    The model's convolutions with a computed kernel (a frozen BatchNorm folded
    in: :func:`conv_bn`; the three heads as one: yolact.PredictionModule) call
    the layer they stand for, so code that replaces the ``forward`` and
    ``convolve`` of the model's Conv2D layers replaces every convolution of
    the model (CPU training: utils.training.cpu_ops.use_cpu_training_convolutions).
    """

    def convolve(self, x, weight, bias):
        """x [B, C, H, W], weight [O, C / groups, kh, kw], bias [O] or None -> [B, O, H', W'],
        with this layer's stride, padding, dilation, groups and data format."""
        return F.conv2d(x, weight, bias, stride=self._stride, padding=self._padding, dilation=self._dilation,
                        groups=self._groups, data_format=self._data_format)


def conv_bn(conv, bn, x):
    """bn(conv(x)) for a bias-free Conv2D followed by nn.BatchNorm2D; [B, C, H, W] -> [B, C', H', W'].

    With the BatchNorm frozen (eval statistics, no gradient for its scale and
    shift: training with freeze_bn) and gradients being recorded, the
    BatchNorm is folded into the convolution: conv(x, W * s) + (beta - mean * s),
    s = gamma / sqrt(var + eps), the same function to float rounding. The
    kernel's gradient flows through the product; the BatchNorm's forward and
    backward passes over the feature map are gone (Paddle 3.3.1 has no fused
    conv + BN kernel in dygraph; they are about 4% of the CPU time of a
    yolact_resnet50 training step at 550, batch 2: AMD EPYC, 2026-12-03).
    Inference (no gradient) keeps the two layers; trainable BatchNorm keeps
    the two ops.
    """
    if (conv.bias is not None or conv._data_format != 'NCHW'
            or not paddle.in_dynamic_mode() or not paddle.is_grad_enabled()):
        return bn(conv(x))
    if bn.training or not bn.weight.stop_gradient:
        return bn(conv(x))
    scale = bn.weight / paddle.sqrt(bn._variance + bn._epsilon)
    shift = bn.bias - bn._mean * scale
    return conv.convolve(x, conv.weight * scale.reshape([-1, 1, 1, 1]), shift)


class ConvBN(nn.Sequential):
    """nn.Sequential(conv, bn, *rest) whose conv + bn pair runs through conv_bn (BatchNorm folded when frozen).

    Same sublayers and parameter names as the plain Sequential.
    """

    def forward(self, x):
        layers = list(self.children())
        x = conv_bn(layers[0], layers[1], x)
        for layer in layers[2:]:
            x = layer(x)
        return x


class ModulatedDeformConv2D(nn.Layer):
    """The reference's ``DCN`` layer: a modulated deformable convolution (DCNv2).

    A plain convolution ``conv_offset_mask`` predicts, per output pixel, 3 * k * k
    channels: the first two thirds are the sampling offsets (as (dy, dx) pairs
    per kernel point, the layout deform_conv2d expects), the last third the
    modulation mask, squashed with a sigmoid.

    Input [B, in_channels, H, W] -> output [B, out_channels, H / stride, W / stride].
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1):
        super().__init__()
        self.stride, self.padding = stride, padding
        fan_in = in_channels * kernel_size * kernel_size
        stdv = 1.0 / math.sqrt(fan_in)
        # Reference initialisation: ImageNet backbones have no weights for these
        # layers, so training starts from exactly this.
        self.weight = self.create_parameter(
            [out_channels, in_channels, kernel_size, kernel_size],
            default_initializer=nn.initializer.Uniform(-stdv, stdv))
        self.bias = self.create_parameter(
            [out_channels], is_bias=True, default_initializer=nn.initializer.Constant(0.0))
        # Zero offsets and a constant mask of sigmoid(0) at the start of training.
        self.conv_offset_mask = nn.Conv2D(
            in_channels, 3 * kernel_size * kernel_size, kernel_size, stride=stride, padding=padding,
            weight_attr=nn.initializer.Constant(0.0), bias_attr=nn.initializer.Constant(0.0))

    def forward(self, x):
        o1, o2, mask = paddle.chunk(self.conv_offset_mask(x), 3, axis=1)
        offset = paddle.concat([o1, o2], axis=1)
        return deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride,
                             padding=self.padding, mask=F.sigmoid(mask))


class Bottleneck(nn.Layer):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), torchvision layout.

    Input [B, inplanes, H, W] -> [B, planes * 4, H / stride, W / stride].
    ``use_dcn`` replaces the 3x3 conv by a modulated deformable conv with bias.
    """
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, use_dcn=False):
        super().__init__()
        self.conv1 = Conv2D(inplanes, planes, 1, bias_attr=False)
        self.bn1 = nn.BatchNorm2D(planes)
        if use_dcn:
            self.conv2 = ModulatedDeformConv2D(planes, planes, 3, stride=stride, padding=1)
        else:
            self.conv2 = Conv2D(planes, planes, 3, stride=stride, padding=1, bias_attr=False)
        self.bn2 = nn.BatchNorm2D(planes)
        self.conv3 = Conv2D(planes, planes * self.expansion, 1, bias_attr=False)
        self.bn3 = nn.BatchNorm2D(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(conv_bn(self.conv1, self.bn1, x))
        out = F.relu(conv_bn(self.conv2, self.bn2, out) if isinstance(self.conv2, Conv2D)
                     else self.bn2(self.conv2(out)))
        out = conv_bn(self.conv3, self.bn3, out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ResNetBackbone(nn.Layer):
    """Bottleneck ResNet without its classifier; returns all four stages.

    Args:
        layers: blocks per stage, e.g. (3, 4, 23, 3) for ResNet-101.
        dcn_layers: per stage, how many of the last blocks may use DCNv2.
        dcn_interval: among those, only every dcn_interval-th block does
            (block index i % dcn_interval == 0; the first block of a stage
            uses DCN only when the whole stage may).
        base_width: stem and first-stage width; stages use base_width * (1, 2, 4, 8).
    Forward: [B, 3, H, W] -> list of 4 maps, channels base_width * (4, 8, 16, 32)
    ((256, 512, 1024, 2048) for the published width 64), strides (4, 8, 16, 32).
    """

    def __init__(self, layers, dcn_layers=(0, 0, 0, 0), dcn_interval=1, base_width=64):
        super().__init__()
        # Registered first, as in the reference, so state_dict orders agree.
        self.layers = nn.LayerList()
        self.channels = []
        self.conv1 = Conv2D(3, base_width, 7, stride=2, padding=3, bias_attr=False)
        self.bn1 = nn.BatchNorm2D(base_width)
        self.maxpool = nn.MaxPool2D(3, stride=2, padding=1)

        inplanes = base_width
        widths = tuple(base_width * m for m in (1, 2, 4, 8))
        for stage, (planes, blocks, num_dcn) in enumerate(zip(widths, layers, dcn_layers)):
            stride = 1 if stage == 0 else 2
            self.layers.append(self._make_stage(inplanes, planes, blocks, stride, num_dcn, dcn_interval))
            inplanes = planes * Bottleneck.expansion
            self.channels.append(inplanes)

    @staticmethod
    def _make_stage(inplanes, planes, blocks, stride, num_dcn, dcn_interval):
        """nn.Sequential of Bottlenecks; the first one projects the shortcut."""
        downsample = None
        if stride != 1 or inplanes != planes * Bottleneck.expansion:
            downsample = ConvBN(
                Conv2D(inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias_attr=False),
                nn.BatchNorm2D(planes * Bottleneck.expansion))
        # The reference's rule, kept verbatim because it decides which checkpoint
        # keys exist: block 0 only when every block may use DCN.
        stage = [Bottleneck(inplanes, planes, stride, downsample, use_dcn=num_dcn >= blocks)]
        for i in range(1, blocks):
            use_dcn = i + num_dcn >= blocks and i % dcn_interval == 0
            stage.append(Bottleneck(planes * Bottleneck.expansion, planes, use_dcn=use_dcn))
        return nn.Sequential(*stage)

    def forward(self, x):
        x = self.maxpool(F.relu(conv_bn(self.conv1, self.bn1, x)))
        outs = []
        for stage in self.layers:
            x = stage(x)
            outs.append(x)
        return outs


def _darknet_conv(in_channels, out_channels, kernel_size, stride=1):
    """Conv (no bias) + BN + LeakyReLU(0.1): the reference's darknetconvlayer."""
    return ConvBN(
        Conv2D(in_channels, out_channels, kernel_size, stride=stride,
               padding=kernel_size // 2, bias_attr=False),
        nn.BatchNorm2D(out_channels),
        nn.LeakyReLU(0.1))


class DarkNetBlock(nn.Layer):
    """Residual 1x1 (channels) -> 3x3 (2 * channels) pair; shape preserving.

    The residual sum is not followed by an activation (as in the reference).
    """
    expansion = 2

    def __init__(self, in_channels, channels):
        super().__init__()
        self.conv1 = _darknet_conv(in_channels, channels, 1)
        self.conv2 = _darknet_conv(channels, channels * self.expansion, 3)

    def forward(self, x):
        return self.conv2(self.conv1(x)) + x


class DarkNetBackbone(nn.Layer):
    """YOLOv3's DarkNet-53 feature extractor; returns all five stages.

    Args:
        layers: residual blocks per stage, (1, 2, 8, 8, 4) for DarkNet-53.
    Forward: [B, 3, H, W] -> list of 5 maps, channels (64, 128, 256, 512, 1024),
    strides (2, 4, 8, 16, 32). Stage i is a stride-2 3x3 conv (``layers.i.0``)
    followed by its residual blocks (``layers.i.1`` ...).
    """

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.LayerList()
        self.channels = []
        self._preconv = _darknet_conv(3, 32, 3)
        in_channels = 32
        for stage, num_blocks in enumerate(layers):
            channels = 32 * 2 ** stage
            out_channels = channels * DarkNetBlock.expansion
            blocks = [_darknet_conv(in_channels, out_channels, 3, stride=2)]
            blocks += [DarkNetBlock(out_channels, channels) for _ in range(num_blocks)]
            self.layers.append(nn.Sequential(*blocks))
            self.channels.append(out_channels)
            in_channels = out_channels

    def forward(self, x):
        x = self._preconv(x)
        outs = []
        for stage in self.layers:
            x = stage(x)
            outs.append(x)
        return outs


def construct_backbone(backbone_cfg):
    """The backbone a data.config.BackboneConfig describes (fresh, untrained)."""
    if backbone_cfg.kind == 'resnet':
        backbone = ResNetBackbone(backbone_cfg.layers, backbone_cfg.dcn_layers, backbone_cfg.dcn_interval,
                                  backbone_cfg.base_width)
    elif backbone_cfg.kind == 'darknet':
        backbone = DarkNetBackbone(backbone_cfg.layers)
    else:
        raise ValueError(f'unknown backbone kind {backbone_cfg.kind!r} (expected resnet or darknet)')
    if max(backbone_cfg.selected_layers) >= len(backbone.channels):
        raise ValueError(f'{backbone_cfg.name}: selected_layers {backbone_cfg.selected_layers} '
                         f'exceed its {len(backbone.channels)} stages')
    return backbone
