"""Reference (PyTorch) weights -> Paddle parameters: explicit rename/drop tables.

The Paddle modules keep the reference's parameter names, so conversion is a
fixed set of renames and drops followed by a strict check against the target
model: every source key must be used or dropped for a stated reason, every
target key filled, every shape equal.

Two kinds of files are converted:

* YOLACT checkpoints (``<config>_<epoch>_<iteration>.pth``) -> the whole
  ``Yolact`` model. Rules: BatchNorm ``running_mean``/``running_var`` ->
  ``_mean``/``_variance``; dropped: ``num_batches_tracked``, pre-1.0
  ``backbone.layerN.*`` names and ``fpn.downsample_layers.N`` beyond the
  config's ``num_downsample`` (the reference's own loader discards both).
* ImageNet backbones the reference trains from -> the backbone alone.
  ResNet files (``resnet101_reducedfc.pth``, ``resnet50-19c8e357.pth``) use
  torchvision names: ``layerN.`` -> ``layers.{N-1}.`` (as the reference's
  ``ResNetBackbone.init_backbone``), ``fc.weight``/``fc.bias`` dropped.
  ``darknet53.pth`` already uses the backbone's names. The same BatchNorm
  rules apply. For YOLACT++ (DCN) backbones the ImageNet file has no
  ``conv2.conv_offset_mask.*`` or ``conv2.bias`` for the deformable blocks;
  those, and only those, stay at their initialisation (zero, as in the
  reference) and are listed in the report.

Either kind saved from a ``torch.nn.DataParallel`` wrapper has every key
prefixed ``module.``; that prefix is stripped (one info line, and a line of
the converter's report) when every key has it, never from a few keys.
"""
import logging
import os
import re
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import paddle

from backbone import construct_backbone
from data.config import CONFIGS
from utils.errors import ConfigError, WeightsError
from utils.files import atomic_paddle_save
from utils.weights.pth_reader import load_pth
from yolact import Yolact

logger = logging.getLogger(__name__)

# BatchNorm statistics: (pattern, replacement) applied to each source key.
RENAMES = (
    (re.compile(r'\.running_mean$'), '._mean'),
    (re.compile(r'\.running_var$'), '._variance'),
)

# Keys never carried over, with the reason shown in the report.
DROPS = (
    (re.compile(r'\.num_batches_tracked$'), 'BatchNorm step counter (Paddle keeps none)'),
    # Reference backward compatibility: pre-1.0 checkpoints named stages backbone.layer1..4.
    (re.compile(r'^backbone\.layer\d'), 'obsolete reference backbone name (backbone.layerN)'),
)

# torchvision ResNet stage names -> backbone names, applied before RENAMES.
TORCHVISION_RENAMES = (
    (re.compile(r'^layer([1-4])\.'), lambda m: f'layers.{int(m.group(1)) - 1}.'),
)

IMAGENET_CLASSIFIER_DROP = (lambda key: key in ('fc.weight', 'fc.bias'),
                            'ImageNet classifier (the backbone has no fc)')

# Backbone keys an ImageNet file cannot provide: the extras of a deformable
# (YOLACT++) block. The reference zero-initialises them before training.
DCN_INIT_KEYS = re.compile(r'^layers\.\d+\.\d+\.conv2\.(bias|conv_offset_mask\.(weight|bias))$')

# What torch.nn.DataParallel (and DistributedDataParallel) put before every key of the model it wraps.
DATA_PARALLEL_PREFIX = 'module.'


class ConversionError(WeightsError):
    """The source does not fit the target; lists every offending key by name."""

    def __init__(self, unused, missing, mismatched, context=''):
        self.unused, self.missing, self.mismatched = unused, missing, mismatched
        lines = [f'state dict does not match the model{context}:']
        if mismatched:
            lines.append(f'  {len(mismatched)} shape mismatch(es) (source -> target):')
            lines += [f'    {k}: {tuple(s)} -> {tuple(t)}' for k, s, t in mismatched]
        if unused:
            lines.append(f'  {len(unused)} source key(s) with no target:')
            lines += [f'    {k}' for k in unused]
        if missing:
            lines.append(f'  {len(missing)} target key(s) missing from the source:')
            lines += [f'    {k}' for k in missing]
        super().__init__('\n'.join(lines))


@dataclass(frozen=True)
class ConversionReport:
    """What a conversion did.

    converted: target keys written; dropped: (source key, reason) pairs;
    left_at_init: target keys the source cannot provide, kept at the model's
    initialisation (only DCN extras of an ImageNet backbone); stripped_prefix:
    the prefix removed from every source key (DATA_PARALLEL_PREFIX), or ''.
    """
    source: str
    target: str
    converted: Tuple[str, ...]
    dropped: Tuple[Tuple[str, str], ...]
    left_at_init: Tuple[str, ...] = ()
    stripped_prefix: str = ''

    def prefix_note(self):
        """The line saying that a DataParallel prefix was stripped, or '' when none was."""
        return _prefix_note(self.source, self.stripped_prefix) if self.stripped_prefix else ''

    def summary(self):
        """One line: file, target, counts."""
        return (f'{os.path.basename(self.source)} -> {self.target}: {len(self.converted)} tensors converted, '
                f'{len(self.dropped)} keys dropped, {len(self.left_at_init)} left at initialisation')


def fpn_downsample_drop(num_downsample):
    """Drop rule for ``fpn.downsample_layers.N`` with N >= num_downsample.

    The reference's own loader discards these: v1.0 checkpoints carry more
    downsample layers than the configs use.
    """
    def rule(key):
        m = re.match(r'^fpn\.downsample_layers\.(\d+)\.', key)
        return bool(m) and int(m.group(1)) >= num_downsample
    return rule, f'fpn.downsample_layers beyond num_downsample={num_downsample}'


def convert_state_dict(source, target_shapes, extra_drops=(), context='', extra_renames=()):
    """Rename and check a reference state dict against a Paddle model.

    Args:
        source: {reference key: np.ndarray}.
        target_shapes: {paddle key: shape} of the model to load into
            (``{k: v.shape for k, v in model.state_dict().items()}``).
        extra_drops: (predicate(key) -> bool, reason) pairs, e.g. ``fpn_downsample_drop(2)``.
        context: text appended to the error's first line (e.g. the file and config).
        extra_renames: (pattern, replacement) pairs applied before RENAMES,
            e.g. TORCHVISION_RENAMES. Drop predicates see the source key.
    Returns:
        ({paddle key: np.ndarray}, [(dropped source key, reason)]).
    Raises:
        ConversionError naming every unused source key, missing target key and
        shape mismatch (by source key).
    """
    out, dropped, unused, mismatched, seen = {}, [], [], [], set()
    for key, value in source.items():
        reason = next((why for pat, why in DROPS if pat.search(key)), None)
        reason = reason or next((why for pred, why in extra_drops if pred(key)), None)
        if reason:
            dropped.append((key, reason))
            continue
        new_key = _renamed(_renamed(key, extra_renames), RENAMES)
        if new_key not in target_shapes:
            unused.append(key)
            continue
        seen.add(new_key)
        value = np.asarray(value)
        if tuple(value.shape) != tuple(target_shapes[new_key]):
            mismatched.append((key, value.shape, target_shapes[new_key]))
            continue
        out[new_key] = value
    missing = [k for k in target_shapes if k not in seen]
    if unused or missing or mismatched:
        raise ConversionError(unused, missing, mismatched, context)
    return out, dropped


def convert_checkpoint(src_path, cfg):
    """A reference YOLACT checkpoint as parameters of ``Yolact.from_config(cfg)``.

    Args:
        src_path: ``.pth`` (either torch.save format), e.g. yolact_base_54_800000.pth.
        cfg: data.config.YolactConfig the checkpoint was trained with.
    Returns:
        ({paddle key: float32 np.ndarray}, ConversionReport).
    Raises:
        utils.weights.pth_reader.PthError if the file cannot be read; ConversionError
        naming every key that does not fit (e.g. the wrong config).
    """
    source, stripped = _without_data_parallel_prefix(load_pth(src_path), src_path)
    target = _target_shapes(Yolact.from_config(cfg))
    params, dropped = convert_state_dict(
        source, target, [fpn_downsample_drop(cfg.fpn.num_downsample)],
        context=f' ({os.path.basename(src_path)} with config {cfg.name})')
    params = _as_float32(params, src_path)
    return params, ConversionReport(src_path, f'config {cfg.name}', tuple(params), tuple(dropped),
                                    stripped_prefix=stripped)


def convert_backbone(src_path, backbone_cfg):
    """An ImageNet backbone file as parameters of ``construct_backbone(backbone_cfg)``.

    Args:
        src_path: resnet101_reducedfc.pth / resnet50-19c8e357.pth (torchvision
            names) or darknet53.pth (backbone names), either torch.save format.
        backbone_cfg: data.config.BackboneConfig to convert for; a DCN variant
            leaves its deformable extras (DCN_INIT_KEYS) at initialisation.
    Returns:
        ({backbone key: float32 np.ndarray}, ConversionReport) -- keys without
        the ``backbone.`` prefix, as ``utils.weights.loader.load_backbone_weights`` loads them.
    Raises:
        utils.weights.pth_reader.PthError or ConversionError as convert_checkpoint.
    """
    if backbone_cfg.kind == 'resnet':
        renames, drops = TORCHVISION_RENAMES, [IMAGENET_CLASSIFIER_DROP]
    else:
        renames, drops = (), []
    source, stripped = _without_data_parallel_prefix(load_pth(src_path), src_path)
    target = _target_shapes(construct_backbone(backbone_cfg))
    provided = {_renamed(_renamed(k, renames), RENAMES) for k in source}
    left_at_init = tuple(k for k in target if DCN_INIT_KEYS.match(k) and k not in provided)
    target = {k: s for k, s in target.items() if k not in left_at_init}
    params, dropped = convert_state_dict(
        source, target, drops, context=f' ({os.path.basename(src_path)} as backbone {backbone_cfg.name})',
        extra_renames=renames)
    params = _as_float32(params, src_path)
    return params, ConversionReport(src_path, f'backbone {backbone_cfg.name}', tuple(params),
                                    tuple(dropped), left_at_init, stripped)


def imagenet_backbone(path):
    """The plain (non-DCN) BackboneConfig whose ImageNet weights file has this name.

    ``resnet101_reducedfc.pth`` -> ResNet101, ``resnet50-19c8e357.pth`` ->
    ResNet50, ``darknet53.pth`` -> DarkNet53 (the names the configs' ``path`` use).
    Raises ConfigError for any other name.
    """
    name = os.path.basename(path)
    for cfg in CONFIGS.values():
        if cfg.backbone.path == name and not any(cfg.backbone.dcn_layers):
            return cfg.backbone
    known = ', '.join(sorted({cfg.backbone.path for cfg in CONFIGS.values()}))
    raise ConfigError(f'cannot infer the backbone from the file name {name!r} (known: {known}); '
                     'name a config whose backbone it is')


def save_params(params, path):
    """Write {key: np.ndarray} as a ``.pdparams`` of float32 Paddle tensors.

    Written atomically (utils/files.py): an interrupted conversion never
    leaves a partial file under the final name. The folder is created when missing.
    Load with ``net.set_state_dict(paddle.load(path))``.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_paddle_save({k: paddle.to_tensor(v, dtype='float32') for k, v in params.items()}, path)
    logger.info('wrote %d tensors to %s', len(params), path)


def _without_data_parallel_prefix(source, src_path):
    """(source, '') or, when every key starts with DATA_PARALLEL_PREFIX, (source without it, the prefix)."""
    if not source or not all(key.startswith(DATA_PARALLEL_PREFIX) for key in source):
        return source, ''
    logger.info('%s', _prefix_note(src_path, DATA_PARALLEL_PREFIX))
    stripped = type(source)((key[len(DATA_PARALLEL_PREFIX):], value) for key, value in source.items())
    return stripped, DATA_PARALLEL_PREFIX


def _prefix_note(src_path, prefix):
    return f'{os.path.basename(src_path)}: saved from DataParallel; stripped the prefix {prefix!r} from every key'


def _target_shapes(layer):
    return {k: tuple(v.shape) for k, v in layer.state_dict().items()}


def _as_float32(params, src_path):
    """Parameters as float32 (the models' dtype); a non-float tensor is an error, not a cast."""
    bad = [f'{k} ({v.dtype})' for k, v in params.items() if not np.issubdtype(v.dtype, np.floating)]
    if bad:
        raise WeightsError(f'{os.path.basename(src_path)}: non-float tensors for float parameters: {", ".join(bad)}')
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in params.items()}


def _renamed(key, renames):
    """Apply each (pattern, replacement) whose pattern matches, in order."""
    for pat, repl in renames:
        if pat.search(key):
            key = pat.sub(repl, key, count=1)
    return key
