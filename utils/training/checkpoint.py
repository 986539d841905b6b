"""Training checkpoints: written whole, resumable, named the reference's way, kept by one policy.

A checkpoint is three files sharing one stem, ``<config>_<epoch>_<iteration>``
(``..._interrupt`` when training was stopped), as the reference names its ``.pth``:

- ``<stem>.pdparams``: the network's state dict (structured names, loadable
  by ``net.set_state_dict(paddle.load(path))`` or eval.py like any weights file);
- ``<stem>.pdopt``: the optimizer's accumulators (SGD momentum) keyed by the
  network's structured parameter names, so that they load into a freshly built
  network whose automatic Paddle tensor names differ, plus the AMP loss-scaler
  state (absent from a weights-only checkpoint such as ``--keep_best``'s);
- ``<stem>.json``: its record (utils.weights.loader.CheckpointRecord): iteration,
  epoch, learning rate, schedule and run settings.

A checkpoint appears whole or not at all (:func:`save_checkpoint`): its files
are written into a staging folder beside their final names and only then
renamed into place, the record last; a save that fails (disk full, an
unwritable folder) removes what it wrote and leaves every final name as it
was. A checkpoint whose record exists is complete: ``latest_checkpoint`` and
``interrupt_checkpoint`` return complete ones only, so a process killed in the
middle of a save never hides or damages the previous checkpoint.

Which checkpoints a run keeps (``--keep_latest``, ``--keep_latest_interval``,
``--keep_best``, one interrupt checkpoint) is :class:`CheckpointPolicy`.
Reading weights is utils.weights.loader.
"""
import logging
import os
import re
import shutil
from dataclasses import dataclass

import paddle

from utils.errors import MissingFileError, OutputError, WeightsError
from utils.files import atomic_paddle_save, atomic_write, fsync_folder, staging_folder
from utils.weights.loader import WEIGHTS_EXT, CheckpointRecord, WeightsFile, read_record, sidecar_paths
from utils.weights.paddle_reader import load_paddle_file

logger = logging.getLogger(__name__)

# The staging folder of a save in progress: ``.<stem><STAGING_MARK><random>`` beside the checkpoint.
STAGING_MARK = '.saving.'

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


def is_complete(weights_path):
    """Whether this checkpoint was saved whole (its record is put in place last)."""
    return os.path.isfile(weights_path) and os.path.isfile(sidecar_paths(weights_path)[1])


def save_checkpoint(weights_path, net, optimizer=None, record=None, scaler=None):
    """Write a checkpoint whole: weights, optimizer state and record all appear, or none of them.

    The files are written into a staging folder beside ``weights_path`` and
    renamed into place, the record last. Files of an earlier checkpoint of
    the same name are replaced as a set (a weights-only save removes its old
    ``.pdopt``); when the save fails they are put back.

    Args:
        weights_path: ``<folder>/<stem>.pdparams`` (see SavePath.path); the folder is created.
        net: the paddle.nn.Layer to save (not a DataParallel wrapper).
        optimizer: its optimizer, or None for a weights-only checkpoint.
        record: its CheckpointRecord (None: an empty one; a record marks the checkpoint complete).
        scaler: a paddle.amp.GradScaler whose state goes with the optimizer's.
    Raises:
        OutputError: 'cannot save checkpoint <path>: <reason>; none of its files were written'.
    """
    folder = os.path.dirname(os.path.abspath(weights_path))
    opt_path, record_path = sidecar_paths(weights_path)
    stem = os.path.basename(weights_path)[:-len(WEIGHTS_EXT)] if weights_path.endswith(WEIGHTS_EXT) \
        else os.path.basename(weights_path)
    record = record if record is not None else CheckpointRecord()
    try:
        with staging_folder(folder, f'.{stem}{STAGING_MARK}', f'checkpoint {weights_path}') as stage:
            staged = [(os.path.join(stage, os.path.basename(weights_path)), weights_path)]
            atomic_paddle_save(net.state_dict(), staged[0][0])
            if optimizer is not None:
                opt_state = {'accumulators': optimizer_state_by_name(optimizer, net)}
                if scaler is not None:
                    opt_state['grad_scaler'] = scaler.state_dict()
                staged.append((os.path.join(stage, os.path.basename(opt_path)), opt_path))
                atomic_paddle_save(opt_state, staged[-1][0])
            staged.append((os.path.join(stage, os.path.basename(record_path)), record_path))
            atomic_write(staged[-1][0], record.to_json())
            _install(staged, [record_path, opt_path, weights_path], os.path.join(stage, 'replaced'))
            fsync_folder(folder)
    except OutputError as err:
        raise OutputError(f'{err}; none of its files were written') from err
    except OSError as err:
        raise OutputError(f'cannot save checkpoint {weights_path}: {err.strerror or err}; '
                          'none of its files were written') from err


def _install(staged, finals, replaced):
    """Rename the staged (source, final) files into place, the last (the record) last.

    The existing files among ``finals`` (the record first) move to the folder
    ``replaced`` first and come back when a rename fails, so the final names
    hold the old checkpoint or the new one, never a mix.
    """
    os.makedirs(replaced)
    moved_away, installed = [], []
    try:
        for final in finals:
            if os.path.lexists(final):
                backup = os.path.join(replaced, os.path.basename(final))
                os.replace(final, backup)
                moved_away.append((backup, final))
        for source, final in staged:
            os.replace(source, final)
            installed.append(final)
    except BaseException:
        for final in reversed(installed):
            _remove_quietly(final)
        # The record comes back last: the old checkpoint is complete again only when whole.
        for backup, final in reversed(moved_away):
            os.replace(backup, final)
        raise


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def load_checkpoint(weights_path, net, optimizer=None, scaler=None):
    """Load a checkpoint saved by save_checkpoint (or bare weights) into ``net``.

    The weights must match the network exactly (every key, every shape).
    The optimizer and scaler states are loaded when given and present.

    Returns:
        (its CheckpointRecord or None when absent, whether optimizer state was loaded).
    Raises:
        WeightsError naming the keys that do not match, the file that cannot be read, or a malformed record.
    """
    weights = WeightsFile(weights_path)
    weights.load_into(net)
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
    return weights.record, loaded_opt


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
    for path in checkpoints_in(folder):
        save = SavePath.from_path(path)
        if save.model_name == model_name and save.iteration > best_iter:
            best, best_iter = path, save.iteration
    return best


def interrupt_checkpoint(folder):
    """A complete interrupt checkpoint in ``folder`` (the newest), or None."""
    saves = [(SavePath.from_path(p).iteration, p) for p in checkpoints_in(folder)
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
    """Delete a checkpoint's files, the record first so that it never looks complete half-deleted."""
    opt_path, record_path = sidecar_paths(weights_path)
    for path in (record_path, opt_path, weights_path):
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


def checkpoints_in(folder):
    """The complete checkpoints in ``folder`` whose names parse (SavePath), sorted by name."""
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


class CheckpointPolicy:
    """The rules that decide which checkpoints of a run are kept (train.py's flags of the same names).

    - Every checkpoint is kept, unless ``keep_latest``: then saving one deletes
      the previous checkpoint of the run, except one at a multiple of
      ``keep_latest_interval`` (by its own iteration; 0: none) and a file not
      named like this run's checkpoints (a .pth or a renamed file resumed from).
    - An interrupt checkpoint replaces the earlier interrupt checkpoints in the folder.
    - What a killed save left (a hidden ``.<stem>.saving.*`` folder) goes at the run's next save.
    - ``keep_best``: after each validation, the weights of the best mask AP so
      far are kept as ``<folder>/<model_name>_best.pdparams`` (a tie keeps the
      earlier); a resumed run continues from the AP recorded there.

    The policy deletes and compares; the Trainer says when a checkpoint was
    saved and what a validation measured.
    """

    def __init__(self, folder, model_name, keep_latest=False, keep_latest_interval=100000, keep_best=False):
        self.folder, self.model_name = folder, model_name
        self.keep_latest, self.keep_latest_interval = keep_latest, keep_latest_interval
        self.keep_best = keep_best

    @classmethod
    def from_options(cls, opts, model_name):
        """The policy of a run's options (utils.training.trainer.TrainOptions: save_folder, keep_latest,
        keep_latest_interval, keep_best)."""
        return cls(opts.save_folder, model_name, opts.keep_latest, opts.keep_latest_interval, opts.keep_best)

    @property
    def best_path(self):
        """Where ``keep_best`` keeps the best weights (not a checkpoint of the run: --resume never picks it)."""
        return os.path.join(self.folder, f'{self.model_name}_best{WEIGHTS_EXT}')

    def path(self, epoch, iteration, interrupt=False):
        """The weights path of the run's checkpoint at ``iteration``."""
        return SavePath(self.model_name, epoch, iteration, interrupt).path(self.folder)

    def saved(self, path, previous, interrupt=False):
        """Apply the rules after ``path`` was saved; ``previous``: the run's checkpoint before it, or None."""
        self._remove_stale_saves()
        if interrupt:
            remove_interrupts(self.folder, keep=path)
            return
        if self.keep_latest and previous is not None and os.path.abspath(previous) != os.path.abspath(path) \
                and not self.kept_by_interval(previous):
            logger.info('deleting the previous checkpoint %s (--keep_latest)', previous)
            remove_checkpoint(previous)

    def _remove_stale_saves(self):
        """Delete the staging folders of this run's saves that a killed process left behind."""
        prefix = f'.{self.model_name}_'
        for name in os.listdir(self.folder):
            if name.startswith(prefix) and STAGING_MARK in name:
                logger.info('deleting %s, left by a save that did not finish', os.path.join(self.folder, name))
                shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)

    def kept_by_interval(self, previous):
        """Whether --keep_latest keeps ``previous`` (the reference's rule): it sits at a multiple of
        --keep_latest_interval, by its own iteration. A file not named like our checkpoints
        (a .pth or a renamed file resumed from) is not ours to delete.

        (The reference tests the new checkpoint's iteration against ``save_interval``, which
        only works while save_interval < keep_latest_interval: otherwise every checkpoint is deleted.)
        """
        try:
            saved = SavePath.from_path(previous)
        except ValueError:
            return True
        interval = self.keep_latest_interval
        return not saved.interrupt and interval > 0 and saved.iteration % interval == 0

    def recorded_best(self, resuming):
        """The mask AP to beat: the one recorded with the best weights when ``resuming``, else -1 (any AP beats it)."""
        if not resuming or not is_complete(self.best_path):
            return -1.0
        best = read_record(self.best_path).mask_AP
        return -1.0 if best is None else float(best)

    @staticmethod
    def is_better(mask_ap, best_mask_ap):
        """Whether a validation's mask AP replaces the best weights (a tie keeps the earlier)."""
        return mask_ap > best_mask_ap
