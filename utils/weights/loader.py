"""The one way to turn weights into a network: config resolution, loading, fine-tuning initialisation.

Every program and ``Predictor`` goes through :func:`load_model` (dygraph) or
:func:`load_exported` (a static model from tools/export_model.py). The config
of a weights file is resolved in this order:

1. an explicit config name (``--config``) wins;
2. else the checkpoint's own record, ``<stem>.json`` beside a ``.pdparams``
   written by train.py (config name, class count, class names), or the
   export's metadata;
3. else the file name, the reference's way (``yolact_base_54_800000.pth`` -> yolact_base).

The classes travel with the weights: a record's class names replace the
preset's, so a model fine-tuned on 4 classes loads as a 4-class model under
its preset's name. Reference ``.pth`` files are converted on the fly, strictly.
"""
import dataclasses
import logging

import paddle

from data.config import config_name_from_weights, get_config
from utils.weights.checkpoint import load_weights, read_record, read_state_dict, require_weights_file, sidecar_paths
from utils.weights.convert import convert_checkpoint
from utils.errors import ConfigError
from utils.deploy.network_export import ExportMeta
from utils.deploy.runners import StaticYolact
from yolact import Yolact

logger = logging.getLogger(__name__)


def weights_record(weights_path):
    """The CheckpointRecord train.py writes beside a ``.pdparams`` checkpoint, or None.

    Raises WeightsError naming the record when it is malformed (utils.weights.checkpoint.read_record).
    """
    if not weights_path.endswith('.pdparams'):
        return None
    return read_record(weights_path)


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
    if record is None and weights_path is not None:
        record = weights_record(weights_path)
        record_source = sidecar_paths(weights_path)[1]
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


def load_weights_file(net, path, cfg, state=None):
    """Load a ``.pth`` (reference checkpoint, converted strictly for ``cfg``) or ``.pdparams`` into ``net``.

    state: the ``.pdparams`` state dict when the caller has read it already.
    """
    require_weights_file(path)
    if path.endswith('.pth'):
        params, report = convert_checkpoint(path, cfg)
        load_weights(net, params)
        logger.info('%s', report.summary())
    else:
        load_weights(net, state if state is not None else read_state_dict(path))
        logger.info('loaded %s', path)


def model_config(weights_path, config_name=None, state=None):
    """The config of a weights file (see the module docstring), without building the network.

    A ``.pdparams`` whose record names no classes is read (or ``state``, its
    state dict, is used) for the class count its weights have.
    """
    require_weights_file(weights_path)
    record = weights_record(weights_path)
    cfg = resolve_config(config_name, weights_path, record, sidecar_paths(weights_path)[1])
    if weights_path.endswith('.pdparams') and not (record is not None and record.class_names):
        cfg = _with_class_count_of(cfg, state if state is not None else read_state_dict(weights_path))
    return cfg


def load_model(weights_path, config_name=None, cfg=None):
    """A network in eval mode with its weights, and its config.

    Args:
        weights_path: a reference ``.pth`` or a ``.pdparams`` (converted, or a train.py checkpoint).
        config_name: overrides the config the weights' record or name gives.
        cfg: use this config as it is (e.g. :func:`model_config`'s, or with a dataset's classes)
            instead of resolving one.
    Returns:
        (cfg, Yolact in eval mode).
    Raises:
        MissingFileError, WeightsError naming every key that does not fit, ConfigError.
    """
    require_weights_file(weights_path)
    # Read once: for the class count (when no record names the classes) and for the weights.
    state = read_state_dict(weights_path) if weights_path.endswith('.pdparams') else None
    cfg = cfg if cfg is not None else model_config(weights_path, config_name, state)
    net = Yolact.from_config(cfg)
    load_weights_file(net, weights_path, cfg, state)
    net.eval()
    return cfg, net


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


def load_exported(path_prefix, config_name=None, device='cpu', use_tensorrt=False):
    """A static network exported by tools/export_model.py, and its config (classes from its metadata).

    Returns (cfg, utils.deploy.runners.StaticYolact), called like the dygraph network.
    """
    meta = ExportMeta.read(path_prefix)
    cfg = resolve_config(config_name, record=meta, record_source=f'the export metadata of {path_prefix}')
    exported, configured = (meta.max_size, meta.num_classes), (cfg.max_size, cfg.num_classes)
    if exported != configured:
        raise ConfigError(f'{path_prefix} was exported for {exported[0]}x{exported[0]} inputs and {exported[1] - 1} '
                          f'classes; config {cfg.name} has {configured[0]}x{configured[0]} and {configured[1] - 1}')
    net = StaticYolact(path_prefix, device=device, use_tensorrt=use_tensorrt)
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
    require_weights_file(path)
    if path.endswith('.pth'):
        source, report = convert_checkpoint(path, get_config(cfg.name))
        logger.info('%s', report.summary())
    else:
        source = read_state_dict(path)
    skipped = load_weights(net, source, skip=class_dependent_keys(net))
    if skipped:
        logger.warning('fine-tuning %s for %d classes: re-initialised the class-dependent tensors %s',
                       path, cfg.num_classes - 1, ', '.join(skipped))
    else:
        logger.info('fine-tuning %s', path)
    return skipped
