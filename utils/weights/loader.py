"""The one way to read weights: a weights file, its record, its config, the network it loads into.

:class:`WeightsFile` is the entry point: it checks the file once, reads its
record (``<stem>.json``) and its state dict at most once, resolves its config
and loads it into a network. Every program, ``Predictor``, training
(fine-tuning, resuming, backbone weights) and tools/export_model.py read
weights through it; :func:`load_model`, :func:`init_for_finetuning` and
:func:`load_backbone_weights` are its common uses. :func:`load_exported`
resolves the config of a static model from tools/export_model.py the same way.

Two kinds of files are read, neither of which can run code:

- a reference ``.pth`` (utils.weights.pth_reader, no torch), converted
  strictly for the config (utils.weights.convert);
- a ``.pdparams`` (utils.weights.paddle_reader), a converted file or a
  train.py checkpoint, loaded strictly (every key, every shape).

The config of a weights file is resolved in this order:

1. an explicit config name (``--config``) wins;
2. else the checkpoint's own record, ``<stem>.json`` beside a ``.pdparams``
   written by train.py (config name, class count, class names), or the
   export's metadata;
3. else the file name, the reference's way (``yolact_base_54_800000.pth`` -> yolact_base).

The classes travel with the weights: a record's class names replace the
preset's, so a model fine-tuned on 4 classes loads as a 4-class model under
its preset's name; a ``.pdparams`` without a record naming its classes gets the
class count its class-confidence conv has.

Writing checkpoints, and which of them a run keeps, is utils.training.checkpoint.
"""
import dataclasses
import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from typing import Optional, Tuple

import paddle

from data.config import config_name_from_weights, get_config
from utils.errors import ConfigError, MissingFileError, WeightsError
from utils.weights.convert import (DCN_INIT_KEYS, IMAGENET_CLASSIFIER_DROP, TORCHVISION_RENAMES,
                                   convert_checkpoint, convert_state_dict)
from utils.weights.paddle_reader import load_paddle_file
from yolact import Yolact

logger = logging.getLogger(__name__)

WEIGHTS_EXT = '.pdparams'
OPTIMIZER_EXT = '.pdopt'
STATE_EXT = '.json'
PTH_EXT = '.pth'


@dataclass(frozen=True)
class CheckpointRecord:
    """``<stem>.json``, the record train.py writes beside a checkpoint's weights.

    Written by utils.training.checkpoint.save_checkpoint and read by :func:`read_record` only.
    Loading a model takes ``config`` and ``class_names`` from it; resuming takes
    ``iteration`` and ``freeze_bn`` and checks ``config``. Every field may be
    absent from a file (None); unknown keys are ignored.
    """
    config: Optional[str] = None
    iteration: Optional[int] = None
    epoch: Optional[int] = None
    lr: Optional[float] = None
    schedule: Optional[dict] = None
    batch_size: Optional[int] = None
    seed: Optional[int] = None
    num_classes: Optional[int] = None
    class_names: Optional[Tuple[str, ...]] = None
    dataset: Optional[str] = None
    freeze_bn: Optional[bool] = None
    # The validation APs (0..1) of a --keep_best checkpoint.
    mask_AP: Optional[float] = None
    box_AP: Optional[float] = None

    def to_json(self):
        """The file's text: the fields that are set, sorted."""
        data = {k: v for k, v in asdict(self).items() if v is not None}
        if self.class_names is not None:
            data['class_names'] = list(self.class_names)
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text, source):
        """Parse a record's text (str or bytes); WeightsError naming ``source`` when it is not a record."""
        try:
            data = json.loads(text)
        except ValueError as err:
            raise WeightsError(f'{source}: the checkpoint record is not valid JSON ({err}); '
                               'restore it or delete it') from None
        if not isinstance(data, dict):
            raise WeightsError(f'{source}: the checkpoint record holds a {type(data).__name__}, '
                               'not a JSON object; restore it or delete it')
        values = {f.name: data[f.name] for f in fields(cls) if data.get(f.name) is not None}
        expected = {'config': (str, 'config name'), 'iteration': (int, 'int'), 'class_names': (list, 'list')}
        for name, (kind, what) in expected.items():
            if name in values and not isinstance(values[name], kind):
                raise WeightsError(f'{source}: "{name}" is a {type(values[name]).__name__}, not a {what}')
        if 'class_names' in values:
            if not all(isinstance(n, str) for n in values['class_names']):
                raise WeightsError(f'{source}: "class_names" is not a list of names')
            values['class_names'] = tuple(values['class_names'])
        return cls(**values)


def sidecar_paths(weights_path):
    """(optimizer path, record path) belonging to a weights path."""
    stem = weights_path[:-len(WEIGHTS_EXT)] if weights_path.endswith(WEIGHTS_EXT) else weights_path
    return stem + OPTIMIZER_EXT, stem + STATE_EXT


def require_weights_file(path):
    """``path``, when it names a file: the one check of every weights input (MissingFileError otherwise)."""
    if not os.path.isfile(path):
        raise MissingFileError(f'weights file not found: {path}')
    return path


def read_record(weights_path):
    """The :class:`CheckpointRecord` beside ``weights_path``, or None when it has none.

    Raises WeightsError naming the record when it is malformed.
    """
    path = sidecar_paths(weights_path)[1]
    if not os.path.isfile(path):
        return None
    with open(path, 'rb') as f:
        return CheckpointRecord.from_json(f.read(), path)


def with_classes(cfg, class_names):
    """``cfg`` for a model with these class names (background excluded), its preset otherwise."""
    class_names = tuple(class_names)
    if class_names == tuple(cfg.dataset.class_names) and len(class_names) + 1 == cfg.num_classes:
        return cfg
    dataset = dataclasses.replace(cfg.dataset, class_names=class_names, label_map=None)
    return dataclasses.replace(cfg, dataset=dataset, num_classes=len(class_names) + 1)


def resolve_config(config_name=None, weights_path=None, record=None, record_source=None):
    """The config of a model: explicit name, else the record's, else the weights' file name.

    ``record``: a CheckpointRecord or ExportMeta (both have ``config`` and
    ``class_names``), read from ``weights_path`` when None; ``record_source``
    names where it was read (for the error of an unknown config it names). Its class names apply
    whatever the name's source.
    """
    if record is None and weights_path is not None and weights_path.endswith(WEIGHTS_EXT):
        record = read_record(weights_path)
        record_source = sidecar_paths(weights_path)[1]
    return _resolve_config(config_name, weights_path, record, record_source)


def _resolve_config(config_name, weights_path, record, record_source):
    """resolve_config with the record given (None: the weights have none)."""
    recorded_name = record.config if record is not None else None
    recorded_classes = record.class_names if record is not None else None
    if config_name is not None:
        cfg = get_config(config_name)
    elif recorded_name:
        try:
            cfg = get_config(recorded_name)
        except ConfigError as err:
            raise ConfigError(f'{record_source or "the model record"}: {err}; '
                              'give the config with --config') from None
    elif weights_path is not None:
        name = config_name_from_weights(weights_path)
        logger.info('config %s (from the file name; --config overrides)', name)
        cfg = get_config(name)
    else:
        raise ConfigError('no config: name one with --config')
    if recorded_classes:
        cfg = with_classes(cfg, recorded_classes)
    return cfg


_UNREAD = object()


class WeightsFile:
    """One weights file (``.pth`` or ``.pdparams``), checked once, its record and state dict read at most once.

    Args:
        path: a reference ``.pth`` or a ``.pdparams`` (converted, or a train.py checkpoint).
    Raises:
        MissingFileError when ``path`` is not a file.
    """

    def __init__(self, path):
        self.path = require_weights_file(path)
        self.is_pth = path.endswith(PTH_EXT)
        self._record = _UNREAD
        self._state = None

    @property
    def record_path(self):
        """Where the record of a ``.pdparams`` is (it may not exist)."""
        return sidecar_paths(self.path)[1]

    @property
    def record(self):
        """Its :class:`CheckpointRecord`, or None (a ``.pth``, or a ``.pdparams`` without one).

        Raises WeightsError naming the record when it is malformed.
        """
        if self._record is _UNREAD:
            self._record = None if not self.path.endswith(WEIGHTS_EXT) else read_record(self.path)
        return self._record

    def state_dict(self, return_numpy=False):
        """The {key: tensor} state dict of a ``.pdparams`` (read once; WeightsError when it is none)."""
        if return_numpy:
            return _read_state_dict(self.path, return_numpy=True)
        if self._state is None:
            self._state = _read_state_dict(self.path)
        return self._state

    def config(self, config_name=None):
        """The config of these weights (see the module docstring), without building the network."""
        cfg = _resolve_config(config_name, self.path, self.record, self.record_path)
        if not self.is_pth and not (self.record is not None and self.record.class_names):
            cfg = _with_class_count_of(cfg, self.state_dict())
        return cfg

    def params_for(self, cfg):
        """The state dict for ``Yolact.from_config(cfg)``: a ``.pth`` converted strictly, a ``.pdparams`` as read."""
        if self.is_pth:
            if cfg is None:
                raise ConfigError(f'{self.path}: a .pth is converted for a config; none was given')
            params, report = convert_checkpoint(self.path, cfg)
            logger.info('%s', report.summary())
            return params
        return self.state_dict()

    def load_into(self, net, cfg=None, skip=None):
        """Load these weights into ``net`` (built for ``cfg``), strictly; returns the skipped keys.

        ``cfg``: what a ``.pth`` is converted for (a ``.pdparams`` loads as it is);
        ``skip``: see :func:`load_weights`.
        """
        skipped = load_weights(net, self.params_for(cfg), name=self.path, skip=skip or (lambda key: False))
        logger.info('loaded %s', self.path)
        return skipped

    def load_model(self, config_name=None, cfg=None):
        """A network in eval mode with these weights, and its config: (cfg, Yolact).

        ``cfg``: use this config as it is (e.g. :meth:`config`'s, or with a
        dataset's classes) instead of resolving one from ``config_name``.
        Raises WeightsError naming every key that does not fit, ConfigError.
        """
        cfg = cfg if cfg is not None else self.config(config_name)
        net = Yolact.from_config(cfg)
        self.load_into(net, cfg)
        net.eval()
        return cfg, net


def load_model(weights_path, config_name=None, cfg=None):
    """``WeightsFile(weights_path).load_model(config_name, cfg)``: (cfg, Yolact in eval mode).

    Raises MissingFileError, WeightsError naming every key that does not fit, ConfigError.
    """
    return WeightsFile(weights_path).load_model(config_name, cfg)


def _read_state_dict(path, return_numpy=False):
    """The {key: tensor} state dict of a ``.pdparams`` file, read by utils.weights.paddle_reader
    (which runs no code from the file); WeightsError when it cannot be read or holds no state dict."""
    state = load_paddle_file(path, return_numpy=return_numpy)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise WeightsError(f'{path}: holds a {type(state).__name__}, not a state dict of named tensors')
    return state


def load_weights(net, source, name='the weights', skip=lambda key: False):
    """Load the state dict ``source`` ({key: array}) into ``net``, strictly.

    Args:
        name: how the error names the source (its file).
        skip: predicate on a key; a key it accepts whose shape differs from the
            network's is left at the network's current value instead of failing
            (fine-tuning with another class count).
    Returns:
        the sorted list of skipped keys.
    Raises:
        WeightsError listing keys missing from the source, keys the network lacks
        and shape mismatches not allowed by ``skip``.
    """
    target = net.state_dict()
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    skipped, mismatched, to_load = [], [], {}
    for key, value in source.items():
        if key not in target:
            continue
        if tuple(value.shape) == tuple(target[key].shape):
            to_load[key] = value
        elif skip(key):
            skipped.append(key)
            to_load[key] = target[key]
        else:
            mismatched.append(f'{key}: {tuple(value.shape)} in the file, {tuple(target[key].shape)} in the model')
    if missing or unexpected or mismatched:
        lines = [f'{name} does not match the model:']
        lines += [f'  missing from the file: {k}' for k in missing]
        lines += [f'  not in the model: {k}' for k in unexpected]
        lines += [f'  shape mismatch: {m}' for m in mismatched]
        raise WeightsError('\n'.join(lines))
    net.set_state_dict(to_load)
    return sorted(skipped)


def _with_class_count_of(cfg, state):
    """cfg with the class count a state dict's class-confidence conv has (a fine-tuned .pdparams
    without its JSON record); the classes are then named 'class_1', 'class_2', ..."""
    weight = state.get('prediction_layers.0.conf_layer.weight')
    per_location = cfg.num_priors_per_location[0]
    if weight is None or weight.shape[0] % per_location:
        return cfg
    num_classes = int(weight.shape[0]) // per_location
    if num_classes == cfg.num_classes or num_classes < 2:
        return cfg
    logger.warning('%d classes in the weights, %d in config %s, and no record of their names: naming them '
                   'class_1 ... class_%d', num_classes - 1, cfg.num_classes - 1, cfg.name, num_classes - 1)
    return with_classes(cfg, [f'class_{i + 1}' for i in range(num_classes - 1)])


def load_exported(path_prefix, config_name=None, device='cpu', use_tensorrt=False, precision='fp32'):
    """A network exported by ``tools/export_model.py --network_only``, and its config (classes from its metadata).

    path_prefix: the export's folder or its prefix (``DIR/model``).

    Returns (cfg, utils.deploy.runners.StaticYolact), called like the dygraph network.
    """
    # Imported here: the deploy side reads weights through this module (require_weights_file).
    from utils.deploy.network_export import ExportMeta, network_export_prefix
    from utils.deploy.runners import StaticYolact
    path_prefix = network_export_prefix(path_prefix)
    meta = ExportMeta.read(path_prefix)
    cfg = resolve_config(config_name, record=meta, record_source=f'the export metadata of {path_prefix}')
    exported, configured = (meta.max_size, meta.num_classes), (cfg.max_size, cfg.num_classes)
    if exported != configured:
        raise ConfigError(f'{path_prefix} was exported for {exported[0]}x{exported[0]} inputs and {exported[1] - 1} '
                          f'classes; config {cfg.name} has {configured[0]}x{configured[0]} and {configured[1] - 1}')
    net = StaticYolact(path_prefix, device=device, use_tensorrt=use_tensorrt, precision=precision)
    return cfg, net


def class_dependent_keys(net):
    """Predicate: does a state-dict key belong to a layer whose shape depends on the class count?

    Those are the class-confidence convs of the heads, the semantic-segmentation
    conv and (YOLACT++) the last conv of the mask-IoU net.
    """
    prefixes = ['semantic_seg_conv.']
    if net.maskiou_net is not None:
        convs = [name for name, layer in net.maskiou_net.named_sublayers(prefix='maskiou_net')
                 if isinstance(layer, paddle.nn.Conv2D)]
        prefixes.append(convs[-1] + '.')
    return lambda key: '.conf_layer.' in key or key.startswith(tuple(prefixes))


def init_for_finetuning(net, path, cfg):
    """Initialise ``net`` (built for ``cfg``) from YOLACT weights trained for any class count.

    ``path``: a ``.pdparams``, or a reference ``.pth`` converted for the preset
    ``cfg.name`` (the class count the published files have). Tensors whose
    shape depends on the class count (:func:`class_dependent_keys`) keep
    ``net``'s fresh initialisation when the counts differ; every other tensor
    must match. Returns the re-initialised keys.
    """
    weights = WeightsFile(path)
    source = weights.params_for(get_config(cfg.name) if weights.is_pth else cfg)
    skipped = load_weights(net, source, name=path, skip=class_dependent_keys(net))
    if skipped:
        logger.warning('fine-tuning %s for %d classes: re-initialised the class-dependent tensors %s',
                       path, cfg.num_classes - 1, ', '.join(skipped))
    else:
        logger.info('fine-tuning %s', path)
    return skipped


def load_backbone_weights(backbone, path):
    """Strictly load ImageNet weights (.pdparams) into a backbone, in place.

    Every backbone parameter must be in the file except the DCN extras
    (utils.weights.convert.DCN_INIT_KEYS), which ImageNet models do not have and which
    then keep their reference initialisation; every tensor in the file must be
    used, except an ImageNet classifier. Raises utils.weights.convert.ConversionError
    naming each key that does not fit.
    """
    source = WeightsFile(path).state_dict(return_numpy=True)
    target = {k: v.shape for k, v in backbone.state_dict().items()
              if k in source or not DCN_INIT_KEYS.match(k)}
    params, dropped = convert_state_dict(source, target, [IMAGENET_CLASSIFIER_DROP],
                                         context=f' (backbone weights {path})',
                                         extra_renames=TORCHVISION_RENAMES)
    for key, reason in dropped:
        logger.debug('backbone weights: dropped %s (%s)', key, reason)
    # Tensor by tensor: set_state_dict would warn about every DCN extra left at its init.
    state = backbone.state_dict()
    for key, value in params.items():
        state[key].set_value(value)
    logger.info('loaded %d backbone tensors from %s (%d left at initialisation)',
                len(params), path, len(state) - len(params))
