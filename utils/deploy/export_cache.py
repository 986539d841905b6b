"""The export cache: each weights file's Paddle Inference export, made on first use and reused.

:class:`ExportCache` keeps one entry per weights content, config, batch size
and Paddle version (:func:`export_cache_key`) in ``$YOLACT_CACHE`` (default
``~/.cache/yolact/exported``). What a lookup finds for a key is one
:class:`EntryState`; :meth:`ExportCache.get` holds every transition between them.

A new export becomes an entry only after it has proven itself
(:func:`check_export`: Paddle Inference runs it in a child process, so a
crash there cannot take this process down, on a fixed input, against the
network it came from).
"""
import dataclasses
import enum
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import paddle

from utils.deploy.child_process import signal_name, strip_ansi
from utils.deploy.network_export import ExportMeta, save_static
from utils.deploy.runners import StaticYolact
from utils.files import atomic_write, staging_folder
from utils.weights.loader import require_weights_file

logger = logging.getLogger(__name__)

# Part of every cache key: bump it when the exported graph, the predictor's
# options or the check of a new entry change for the same weights and config
# (2: entries carry a file list and passed the child-process check).
CACHE_FORMAT = 2
_PARTIAL = '.partial-'
# In an entry: every file's size, mtime and SHA-256, written when it is complete.
FILES_SUFFIX = '.files.json'
# Beside an entry's name: the verdict of an export that failed its check.
FAILED_SUFFIX = '.failed.json'
# The first-use check runs the export in a child process; a hang there is a failure too.
CHECK_TIMEOUT = 900
# Free bytes an export needs beyond the size of its weights (graph, metadata, the check's arrays).
_FREE_MARGIN = 64 * 2 ** 20


class EntryState(enum.Enum):
    """What the cache holds for one key, and so what :meth:`ExportCache.get` does next."""
    MISSING = 'missing'             # no entry: export, check, store (-> VALID, FAILED_CHECK or UNWRITABLE)
    VALID = 'valid'                 # an intact entry: its prefix is returned
    DAMAGED = 'damaged'             # an entry whose files differ from its file list: exported again, as MISSING
    FAILED_CHECK = 'failed-check'   # a verdict beside the entry's name: None (dygraph), one warning, no new check
    UNWRITABLE = 'unwritable'       # the folder cannot take a new entry (read-only, full, not a folder):
                                    # None (dygraph), one warning naming the folder; the next run tries again


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """Where one key's export lives.

    folder: ``<cache>/<config>-<key[:24]>``; prefix: ``<folder>/<config>``, the prefix for StaticYolact.
    """
    config: str
    folder: str
    prefix: str

    @property
    def verdict_path(self):
        return self.folder + FAILED_SUFFIX


def default_cache_dir():
    """Where the export cache lives: ``$YOLACT_CACHE``, else ``~/.cache/yolact/exported``."""
    return os.environ.get('YOLACT_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'yolact', 'exported')


def export_cache_key(cfg, weights_path, batch_size=1):
    """Hex key of an export: the weights file's content, the config, the class count, Paddle's version.

    The config is the frozen dataclass's repr, so any field (input size,
    anchors, head layout) changes the key; the weights enter by a SHA-256 of
    their bytes, not their name or date.
    """
    parts = {'weights': _sha256(require_weights_file(weights_path)), 'config': repr(cfg),
             'num_classes': cfg.num_classes,
             'paddle': paddle.__version__, 'batch_size': batch_size, 'format': CACHE_FORMAT}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cached_export(load_net, cfg, weights_path, cache_dir=None, batch_size=1):
    """``ExportCache(cache_dir).get(load_net, cfg, weights_path, batch_size)``; see :meth:`ExportCache.get`."""
    return ExportCache(cache_dir).get(load_net, cfg, weights_path, batch_size)


class ExportCache:
    """The folder of cached exports (default :func:`default_cache_dir`).

    An entry records every file's size and SHA-256 (``<config>.files.json``):
    a damaged entry (truncated, edited, missing file) is found on the next use
    and exported again. A failed check is remembered in
    ``<entry>.failed.json`` and not repeated; the key holds Paddle's version,
    so another Paddle checks again.

    The cache is an optimisation: a folder that cannot be written (read-only,
    full, a path through a file) gives one warning naming it and the dygraph
    network, never an error; an export is started only with room for it (the
    weights' size and a margin free).

    An entry is exported into its own ``.partial-<host>-<pid>-*`` folder and
    renamed to its final name when complete, so a killed export leaves no
    entry, and of concurrent exporters of one key the first rename wins and
    the others use the winner's copy. Partial folders of dead processes on
    this host (and any older than a day) are removed before each new export.
    """

    def __init__(self, cache_dir=None):
        self.folder = cache_dir or default_cache_dir()

    def entry(self, cfg, weights_path, batch_size=1):
        """The CacheEntry of ``weights_path`` for ``cfg`` (reads the weights' bytes for the key)."""
        key = export_cache_key(cfg, weights_path, batch_size)
        folder = os.path.join(self.folder, f'{cfg.name}-{key[:24]}')
        return CacheEntry(cfg.name, folder, os.path.join(folder, cfg.name))

    def state(self, entry):
        """(EntryState, detail) of ``entry`` as found on disk: MISSING, VALID, DAMAGED or FAILED_CHECK.

        detail: the recorded cause (FAILED_CHECK), what is wrong (DAMAGED), else None.
        """
        verdict = _read_verdict(entry.verdict_path)
        if verdict is not None:
            return EntryState.FAILED_CHECK, verdict.get('cause', 'no cause recorded')
        if not os.path.lexists(entry.folder):
            return EntryState.MISSING, None
        problem = _entry_problem(entry.prefix)
        return (EntryState.VALID, None) if problem is None else (EntryState.DAMAGED, problem)

    def get(self, load_net, cfg, weights_path, batch_size=1):
        """The prefix of the cached export of ``weights_path`` for ``cfg``, exporting it on first use; or None.

        Args:
            load_net: no arguments -> a ``Yolact`` for ``cfg`` with the weights of
                ``weights_path`` loaded; called only when the entry is missing, so a
                cache hit builds no network. The caller may call it again for the
                same network (e.g. ``functools.cache``d) when None is returned.
            cfg: its YolactConfig.
            weights_path: the file those weights came from (its bytes enter the key).
            batch_size: as for utils.deploy.network_export.export_yolact.
        Returns:
            ``<cache_dir>/<config>-<key>/<config>``, a prefix for StaticYolact;
            None when the export failed its check or the cache cannot take it:
            run the dygraph network instead (one warning names the cause).
        """
        entry = self.entry(cfg, weights_path, batch_size)
        state, detail = self.state(entry)
        damage = None   # what was wrong with a DAMAGED entry being exported again
        while True:
            if state is EntryState.VALID:
                if damage is not None:
                    logger.warning('the cached export %s was damaged (%s); exported it again', entry.folder, damage)
                logger.info('using the cached export %s', entry.folder)
                return entry.prefix
            if state is EntryState.FAILED_CHECK:
                kept = (f'verdict kept in {entry.verdict_path}' if os.path.isfile(entry.verdict_path)
                        else 'the verdict could not be kept: the next run checks again')
                logger.warning('the Paddle Inference export of %s failed its check on Paddle %s (%s): running the '
                               'dygraph network instead, slower on a CPU (%s; another Paddle version checks again)',
                               cfg.name, paddle.__version__, detail, kept)
                return None
            if state is EntryState.UNWRITABLE:
                damaged = '' if damage is None else f'; its damaged entry ({damage}) stays'
                logger.warning('the export cache %s cannot take the export of %s (%s%s): running the dygraph network '
                               'instead, slower on a CPU (set YOLACT_CACHE to a writable folder with room)',
                               self.folder, cfg.name, detail, damaged)
                return None
            if state is EntryState.DAMAGED:
                damage = detail
                logger.info('the cached export %s is damaged (%s); exporting it again', entry.folder, detail)
            state, detail = self._export(load_net, cfg, entry, weights_path, batch_size)

    def _export(self, load_net, cfg, entry, weights_path, batch_size):
        """Export, check and store ``entry``: (VALID, None), (FAILED_CHECK, cause) or (UNWRITABLE, reason).

        The network is built first: the dygraph fallback needs it too (the
        caller's load_net may cache it). Any OSError while writing the cache
        (read-only, disk full, a folder that is a file) is UNWRITABLE.
        """
        net = load_net()
        need = os.path.getsize(weights_path) + _FREE_MARGIN
        try:
            os.makedirs(self.folder, exist_ok=True)
            _remove_dead_partials(self.folder)
            free = shutil.disk_usage(self.folder).free
            if free < need:
                return EntryState.UNWRITABLE, f'{_mb(free)} free, the export needs about {_mb(need)}'
            prefix = f'{_PARTIAL}{socket.gethostname()}-{os.getpid()}-'
            with staging_folder(self.folder, prefix, 'the export cache') as stage:
                stage_prefix = os.path.join(stage, cfg.name)
                save_static(net, cfg, stage_prefix, batch_size)
                cause = check_export(net, stage_prefix)
                if cause is not None:
                    # paddle.jit.save does not report a full disk: its truncated files fail the check.
                    # No verdict then, since the export itself may be sound.
                    free = shutil.disk_usage(self.folder).free
                    if free < _FREE_MARGIN:
                        return EntryState.UNWRITABLE, f'{_mb(free)} free after the export, which failed its check'
                    try:
                        _write_verdict(entry.verdict_path, cause)
                    except OSError:
                        pass   # the warning says so; the next run checks again
                    return EntryState.FAILED_CHECK, cause
                _write_file_list(stage_prefix)
                if os.path.lexists(entry.folder):
                    _discard(entry.folder, self.folder)
                try:
                    os.rename(stage, entry.folder)
                except OSError:
                    if _entry_problem(entry.prefix) is not None:
                        raise
                    logger.info('%s was exported concurrently; using that copy', entry.folder)
        except OSError as e:
            return EntryState.UNWRITABLE, _os_reason(e)
        logger.info('exported %s (%dx%d, batch %d) to the cache %s', cfg.name, cfg.max_size, cfg.max_size,
                    batch_size, entry.folder)
        return EntryState.VALID, None


def _os_reason(error):
    """The system's reason for a failed write, with the file it names (an OutputError's cause's)."""
    cause = error.__cause__ if isinstance(error.__cause__, OSError) else error
    reason = cause.strerror or str(cause)
    return f'{reason}: {cause.filename}' if cause.filename else reason


def _mb(size):
    return f'{size / 2 ** 20:.0f} MB'


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def _write_verdict(path, cause):
    """Write a failed check's verdict atomically."""
    verdict = {'cause': cause, 'paddle': paddle.__version__, 'time': time.strftime('%Y-%m-%dT%H:%M:%S')}
    atomic_write(path, json.dumps(verdict, indent=2))


def _read_verdict(path):
    """A failed check's verdict dict, or None (none, or unreadable: then the check runs again)."""
    try:
        with open(path) as f:
            verdict = json.load(f)
    except (OSError, ValueError):
        return None
    return verdict if isinstance(verdict, dict) else None


def _write_file_list(path_prefix):
    """Record size, mtime and SHA-256 of every file of the export ``path_prefix`` in its FILES_SUFFIX file."""
    folder = os.path.dirname(path_prefix)
    files = {}
    for name in sorted(os.listdir(folder)):
        stat = os.stat(os.path.join(folder, name))
        files[name] = {'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns,
                       'sha256': _sha256(os.path.join(folder, name))}
    with open(path_prefix + FILES_SUFFIX, 'w') as f:
        json.dump(files, f, indent=1)


def _entry_problem(path_prefix):
    """What is wrong with the cache entry of ``path_prefix`` (a short phrase), or None when it is intact.

    Sizes are compared on every use; a file's SHA-256 only when its mtime
    differs from the recorded one, so an intact entry costs no reading.
    """
    folder = os.path.dirname(path_prefix)
    try:
        with open(path_prefix + FILES_SUFFIX) as f:
            files = json.load(f)
        if not isinstance(files, dict) or not files:
            raise ValueError
    except (OSError, ValueError):
        return f'no valid {os.path.basename(path_prefix) + FILES_SUFFIX}'
    for name, record in files.items():
        path = os.path.join(folder, name)
        try:
            stat = os.stat(path)
            if stat.st_size != record['size']:
                return f'{name} has {stat.st_size} bytes, {record["size"]} were written'
            if stat.st_mtime_ns != record['mtime_ns'] and _sha256(path) != record['sha256']:
                return f'{name} was modified'
        except FileNotFoundError:
            return f'{name} is missing'
        except (OSError, KeyError, TypeError) as e:
            return f'{name} cannot be checked ({e})'
    return None


def _discard(entry, cache_dir):
    """Remove a damaged entry: renamed to a partial name first, so no reader sees it half-deleted."""
    doomed = tempfile.mkdtemp(prefix=f'{_PARTIAL}{socket.gethostname()}-{os.getpid()}-', dir=cache_dir)
    try:
        os.rename(entry, os.path.join(doomed, 'entry'))
    except OSError:
        pass   # another process replaced or removed it first
    shutil.rmtree(doomed, ignore_errors=True)


def _remove_dead_partials(cache_dir, max_age=24 * 3600):
    """Delete partial exports left by killed processes: this host's dead pids, or older than max_age s."""
    host = socket.gethostname()
    for name in os.listdir(cache_dir):
        if not name.startswith(_PARTIAL):
            continue
        path = os.path.join(cache_dir, name)
        owner_host, _, rest = name[len(_PARTIAL):].rpartition('-')[0].rpartition('-')
        pid = int(rest) if rest.isdigit() else None
        try:
            stale = time.time() - os.path.getmtime(path) > max_age
        except OSError:
            continue
        if stale or (owner_host == host and pid is not None and not _process_alive(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# The check of a new export, run in a child process (argv: project root, export prefix,
# .npz of the input and the expected outputs); see check_export.
_CHECK_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from utils.deploy.export_cache import _compare_export_outputs
problem = _compare_export_outputs(sys.argv[2], sys.argv[3])
if problem:
    print(problem)
    sys.exit(3)
"""
# utils/deploy/export_cache.py -> the project root.
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check_export(net, path_prefix):
    """Run the export ``path_prefix`` of ``net`` in a child process on a fixed input; None if it agrees.

    The child creates the CPU predictor the way StaticYolact does by
    default (oneDNN) and compares its outputs, and the mask-IoU net's, with
    ``net``'s on the same input. Returns the cause of a failure as a short
    phrase: a crash (the signal), an error (its last line), a timeout, or the
    first output that differs.
    """
    meta = ExportMeta.read(path_prefix)
    rng = np.random.RandomState(0)
    size = meta.max_size
    arrays = {'x': rng.standard_normal([meta.batch_size, 3, size, size]).astype(np.float32)}
    with paddle.no_grad():
        out = net(paddle.to_tensor(arrays['x']))
        arrays.update({f'out_{k}': out[k].numpy() for k in meta.outputs})
        if meta.maskiou:
            side = arrays['out_proto'].shape[1]
            arrays['masks'] = (rng.rand(2, 1, side, side) > 0.5).astype(np.float32)
            arrays['out_maskiou'] = net.maskiou_net(paddle.to_tensor(arrays['masks'])).numpy()
    with tempfile.TemporaryDirectory(prefix='.check-', dir=os.path.dirname(path_prefix)) as folder:
        inputs = os.path.join(folder, 'check.npz')
        np.savez(inputs, **arrays)
        command = [sys.executable, '-c', _CHECK_CHILD, _PROJECT_ROOT, path_prefix, inputs]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=CHECK_TIMEOUT)
        except subprocess.TimeoutExpired:
            return f'Paddle Inference did not finish within {CHECK_TIMEOUT} s'
    if result.returncode == 0:
        return None
    if result.returncode < 0:
        return f'Paddle Inference crashed with {signal_name(-result.returncode)} running the export'
    if result.returncode == 3 and result.stdout.strip():
        return result.stdout.strip().splitlines()[-1]
    lines = [line.strip() for line in strip_ansi(result.stdout + result.stderr).splitlines() if line.strip()]
    last = lines[-1][:300] if lines else f'exit status {result.returncode}'
    return f'Paddle Inference failed running the export: {last}'


def _compare_export_outputs(path_prefix, inputs_path):
    """In check_export's child: the first output of the export that differs from the expected one, or None.

    Agreement: every value finite and within 1e-3 x (1 + the output's largest
    magnitude). Float reordering in oneDNN's kernels moves YOLACT's outputs by
    ~1e-5; a broken graph (a wrong fusion, a lost attribute) by far more.
    """
    with np.load(inputs_path) as z:
        arrays = {k: z[k] for k in z.files}
    runner = StaticYolact(path_prefix)
    got = {k: v.numpy() for k, v in runner(arrays['x']).items()}
    if runner.maskiou_net is not None:
        got['maskiou'] = runner.maskiou_net(paddle.to_tensor(arrays['masks'])).numpy()
    for key in sorted(k[len('out_'):] for k in arrays if k.startswith('out_')):
        expected, value = arrays['out_' + key], got.get(key)
        if value is None or value.shape != expected.shape:
            return f'output {key} has shape {None if value is None else value.shape}, expected {expected.shape}'
        bound = 1e-3 * (1 + float(np.abs(expected).max(initial=0)))
        if not np.isfinite(value).all():
            return f'output {key} is not finite'
        worst = float(np.abs(value - expected).max(initial=0))
        if worst > bound:
            return f'output {key} differs from dygraph by {worst:.3g} (allowed {bound:.3g})'
    return None
