"""Training checkpoints: atomic, resumable, named the reference's way.

A checkpoint is up to three files sharing one stem, ``<config>_<epoch>_<iteration>``
(``..._interrupt`` when saved on Ctrl+C), as the reference names its ``.pth``:

- ``<stem>.pdparams``: the network's state dict (structured names, loadable
  by ``net.set_state_dict(paddle.load(path))`` or eval.py like any weights file);
- ``<stem>.pdopt``: the optimizer's accumulators (SGD momentum) keyed by the
  network's structured parameter names, so that they load into a freshly built
  network whose automatic Paddle tensor names differ, plus the AMP loss-scaler state;
- ``<stem>.json``: iteration, epoch, learning rate, schedule and run settings.

Every file is written atomically (utils/files.py), so a file either has its
old content or its new one. The JSON is written last: a checkpoint whose JSON
exists is complete, and ``latest_checkpoint``/``interrupt_checkpoint`` only
return complete ones. A save that dies midway therefore never hides or damages
the previous checkpoint.
"""
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Optional, Tuple

import paddle

from utils.weights.convert import (DCN_INIT_KEYS, IMAGENET_CLASSIFIER_DROP, TORCHVISION_RENAMES,
                                   convert_state_dict)
from utils.errors import MissingFileError, WeightsError
from utils.files import atomic_paddle_save, atomic_write
from utils.weights.paddle_reader import load_paddle_file

logger = logging.getLogger(__name__)

WEIGHTS_EXT = '.pdparams'
OPTIMIZER_EXT = '.pdopt'
STATE_EXT = '.json'

# Separates the structured parameter name from the accumulator suffix in .pdopt keys.
_ACC_SEP = '@'

_STEM = re.compile(r'^(?P<name>.+)_(?P<epoch>\d+)_(?P<iteration>\d+)(?P<interrupt>_interrupt)?$')


@dataclass(frozen=True)
class SavePath:
    """The reference's checkpoint name: ``<model_name>_<epoch>_<iteration>[_interrupt]``."""
    model_name: str
    epoch: int
    iteration: int
    interrupt: bool = False

    @property
    def stem(self):
        suffix = '_interrupt' if self.interrupt else ''
        return f'{self.model_name}_{self.epoch}_{self.iteration}{suffix}'

    def path(self, folder):
        """The weights file of this checkpoint in ``folder``."""
        return os.path.join(folder, self.stem + WEIGHTS_EXT)

    @classmethod
    def from_path(cls, path):
        """Parse a weights file name (``.pdparams`` or the reference's ``.pth``).

        Raises ValueError when the name does not follow the pattern.
        """
        stem = os.path.basename(path)
        for ext in (WEIGHTS_EXT, '.pth'):
            if stem.endswith(ext):
                stem = stem[:-len(ext)]
        m = _STEM.match(stem)
        if m is None:
            raise ValueError(f'{os.path.basename(path)!r} is not named <config>_<epoch>_<iteration>'
                             f'[_interrupt]{WEIGHTS_EXT}')
        return cls(m['name'], int(m['epoch']), int(m['iteration']), bool(m['interrupt']))


@dataclass(frozen=True)
class CheckpointRecord:
    """``<stem>.json``, the record train.py writes beside a checkpoint's weights.

    Written by :func:`save_checkpoint` and read by :func:`read_record` only.
    Loading a model takes ``config`` and ``class_names`` from it (utils.weights.loader);
    resuming takes ``iteration`` and ``freeze_bn`` and checks ``config``. Every
    field may be absent from a file (None); unknown keys are ignored.
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


def read_record(weights_path):
    """The :class:`CheckpointRecord` beside ``weights_path``, or None when it has none."""
    path = sidecar_paths(weights_path)[1]
    if not os.path.isfile(path):
        return None
    with open(path, 'rb') as f:
        return CheckpointRecord.from_json(f.read(), path)


def sidecar_paths(weights_path):
    """(optimizer path, state path) belonging to a weights path."""
    stem = weights_path[:-len(WEIGHTS_EXT)] if weights_path.endswith(WEIGHTS_EXT) else weights_path
    return stem + OPTIMIZER_EXT, stem + STATE_EXT


def is_complete(weights_path):
    """Whether the save of this checkpoint finished (its state file is written last)."""
    return os.path.isfile(weights_path) and os.path.isfile(sidecar_paths(weights_path)[1])


def save_checkpoint(weights_path, net, optimizer=None, record=None, scaler=None):
    """Write a checkpoint atomically: weights, then optimizer, then the JSON record.

    Args:
        weights_path: ``<folder>/<stem>.pdparams`` (see SavePath.path).
        net: the paddle.nn.Layer to save (not a DataParallel wrapper).
        optimizer: its optimizer, or None for a weights-only checkpoint.
        record: its :class:`CheckpointRecord`, or None.
        scaler: a paddle.amp.GradScaler whose state goes with the optimizer's.
    """
    folder = os.path.dirname(os.path.abspath(weights_path))
    os.makedirs(folder, exist_ok=True)
    opt_path, state_path = sidecar_paths(weights_path)
    if os.path.exists(state_path):
        # Rewriting a checkpoint of the same name: incomplete until its new state lands.
        os.remove(state_path)
    atomic_paddle_save(net.state_dict(), weights_path)
    if optimizer is not None:
        opt_state = {'accumulators': optimizer_state_by_name(optimizer, net)}
        if scaler is not None:
            opt_state['grad_scaler'] = scaler.state_dict()
        atomic_paddle_save(opt_state, opt_path)
    if record is not None:
        atomic_write(state_path, record.to_json())


def load_checkpoint(weights_path, net, optimizer=None, scaler=None):
    """Load a checkpoint saved by save_checkpoint (or bare weights) into ``net``.

    The weights must match the network exactly (every key, every shape).
    The optimizer and scaler states are loaded when given and present.

    Returns:
        (its CheckpointRecord or None when absent, whether optimizer state was loaded).
    Raises:
        WeightsError naming the keys that do not match, the file that cannot be read, or a malformed record.
    """
    load_weights(net, weights_path)
    opt_path = sidecar_paths(weights_path)[0]
    loaded_opt = False
    if optimizer is not None and os.path.isfile(opt_path):
        opt_state = load_paddle_file(opt_path)
        if not isinstance(opt_state, dict) or not isinstance(opt_state.get('accumulators'), dict):
            raise WeightsError(f'{opt_path}: not an optimizer state written by train.py '
                               f'(a {type(opt_state).__name__} without an accumulators dict)')
        try:
            load_optimizer_state_by_name(optimizer, net, opt_state['accumulators'])
        except (AssertionError, KeyError, TypeError, ValueError) as err:
            # Paddle asserts that every accumulator is present; a state of another model fails here.
            raise WeightsError(f'{opt_path}: does not fit the model and optimizer: {err}') from None
        if scaler is not None and opt_state.get('grad_scaler'):
            scaler.load_state_dict(opt_state['grad_scaler'])
        loaded_opt = True
    return read_record(weights_path), loaded_opt


def require_weights_file(path):
    """``path``, when it names a file: the one check of every weights input (MissingFileError otherwise)."""
    if not os.path.isfile(path):
        raise MissingFileError(f'weights file not found: {path}')
    return path


def read_state_dict(path, return_numpy=False):
    """The {key: tensor} state dict of a ``.pdparams`` file.

    Read by utils.weights.paddle_reader, which runs no code from the file. Raises
    MissingFileError when it does not exist, WeightsError when it cannot be
    read or holds something other than a state dict.
    """
    require_weights_file(path)
    state = load_paddle_file(path, return_numpy=return_numpy)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise WeightsError(f'{path}: holds a {type(state).__name__}, not a state dict of named tensors')
    return state


def load_weights(net, source, skip=lambda key: False):
    """Load weights into ``net``, strictly.

    Args:
        source: a ``.pdparams`` path, or a {key: array} state dict.
        skip: predicate on a key; a key it accepts whose shape differs from the
            network's is left at the network's current value instead of failing
            (fine-tuning with another class count).
    Returns:
        the sorted list of skipped keys.
    Raises:
        WeightsError listing keys missing from the source, keys the network lacks
        and shape mismatches not allowed by ``skip``, or naming a file that is
        not a state dict; MissingFileError for a missing file.
    """
    name = source if isinstance(source, str) else 'the weights'
    if isinstance(source, str):
        source = read_state_dict(source)
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


def load_backbone_weights(backbone, path):
    """Strictly load ImageNet weights (.pdparams) into a backbone, in place.

    Every backbone parameter must be in the file except the DCN extras
    (utils.weights.convert.DCN_INIT_KEYS), which ImageNet models do not have and which
    then keep their reference initialisation; every tensor in the file must be
    used, except an ImageNet classifier. Raises utils.weights.convert.ConversionError
    naming each key that does not fit.
    """
    source = read_state_dict(path, return_numpy=True)
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


def optimizer_state_by_name(optimizer, net):
    """The optimizer's accumulators keyed ``<structured param name>@<accumulator>``.

    Paddle keys them by automatic tensor names (``conv2d_12.w_0_velocity_0``),
    which depend on how many layers the process built before; structured
    names (``backbone.conv1.weight@velocity_0``) do not.
    """
    by_tensor_name = {p.name: name for name, p in net.named_parameters()}
    out = {}
    for key, value in optimizer.state_dict().items():
        if key == 'master_weights':
            # AMP O2 float32 copies: {tensor name: tensor}.
            out[key] = {by_tensor_name[k]: v for k, v in value.items()}
        elif isinstance(value, paddle.Tensor):
            param_name, suffix = _split_accumulator_key(key, by_tensor_name)
            out[by_tensor_name[param_name] + _ACC_SEP + suffix] = value
        else:
            # Bookkeeping entries that depend on nothing but the optimizer.
            out[key] = value
    return out


def load_optimizer_state_by_name(optimizer, net, state):
    """Inverse of optimizer_state_by_name, for the parameters of ``net``."""
    by_struct_name = {name: p.name for name, p in net.named_parameters()}
    renamed = {}
    for key, value in state.items():
        if key == 'master_weights':
            value = {by_struct_name[k]: v for k, v in value.items()}
        elif _ACC_SEP in key:
            struct_name, suffix = key.split(_ACC_SEP, 1)
            if struct_name not in by_struct_name:
                raise ValueError(f'optimizer state for {struct_name!r}, which the model does not have')
            key = f'{by_struct_name[struct_name]}_{suffix}'
        renamed[key] = value
    optimizer.set_state_dict(renamed)


def latest_checkpoint(folder, model_name):
    """The complete checkpoint of ``model_name`` in ``folder`` with the highest iteration, or None.

    Interrupt checkpoints count too, as in the reference's ``--resume latest``.
    """
    best, best_iter = None, -1
    for path in _checkpoints(folder):
        save = SavePath.from_path(path)
        if save.model_name == model_name and save.iteration > best_iter:
            best, best_iter = path, save.iteration
    return best


def interrupt_checkpoint(folder):
    """A complete interrupt checkpoint in ``folder`` (the newest), or None."""
    saves = [(SavePath.from_path(p).iteration, p) for p in _checkpoints(folder)
             if SavePath.from_path(p).interrupt]
    return max(saves)[1] if saves else None


def find_resume_checkpoint(resume, folder, model_name):
    """The checkpoint ``--resume`` designates, or None to start a new run.

    ``resume``: None, 'interrupt' (the interrupt checkpoint in ``folder``),
    'latest' (the newest checkpoint of ``model_name`` there; a missing one
    starts a new run, with a warning) or a path, which must exist.
    """
    if resume is None:
        return None
    if resume == 'interrupt':
        path = interrupt_checkpoint(folder)
    elif resume == 'latest':
        path = latest_checkpoint(folder, model_name)
    else:
        if not os.path.isfile(resume):
            raise MissingFileError(f'--resume: checkpoint not found: {resume}')
        return resume
    if path is None:
        logger.warning('--resume %s: no such checkpoint in %s; starting a new run', resume, folder)
    return path


def remove_checkpoint(weights_path):
    """Delete a checkpoint's files, the state first so that it never looks complete half-deleted."""
    opt_path, state_path = sidecar_paths(weights_path)
    for path in (state_path, opt_path, weights_path):
        if os.path.exists(path):
            os.remove(path)


def remove_interrupts(folder, keep=None):
    """Delete every interrupt checkpoint in ``folder`` except ``keep`` (a weights path)."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not name.endswith(WEIGHTS_EXT) or (keep and os.path.abspath(path) == os.path.abspath(keep)):
            continue
        try:
            interrupt = SavePath.from_path(path).interrupt
        except ValueError:
            continue
        if interrupt:
            remove_checkpoint(path)


def _checkpoints(folder):
    """Complete checkpoints in ``folder`` whose names parse."""
    if not os.path.isdir(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.endswith(WEIGHTS_EXT) or not is_complete(path):
            continue
        try:
            SavePath.from_path(path)
        except ValueError:
            continue
        out.append(path)
    return out


def _split_accumulator_key(key, tensor_names):
    """``conv2d_3.w_0_velocity_0`` -> (``conv2d_3.w_0``, ``velocity_0``) for a known tensor name."""
    # Longest first, so that a name that happens to prefix another cannot steal its key.
    for name in sorted(tensor_names, key=len, reverse=True):
        if key.startswith(name + '_'):
            return name, key[len(name) + 1:]
    raise ValueError(f'optimizer state {key!r} belongs to no parameter of the model')
