"""Process-wide settings shared by the programs: device, CPU threads, DataLoader shared memory,
COCO zips, Paddle's import warning.

Paddle is imported inside the functions so that :func:`quiet_paddle_import`
can run before the program's first ``import paddle``.
"""
import contextlib
import logging
import os
import shutil
import signal
import threading
import warnings
import zipfile

from utils.errors import ConfigError, DatasetError, Terminated
from utils.files import staging_folder

logger = logging.getLogger(__name__)

# Paddle's warning at import (paddle.utils.cpp_extension looks for ccache,
# which only matters when compiling custom C++ operators).
CCACHE_WARNING = 'No ccache found'


def quiet_paddle_import():
    """Silence Paddle's "No ccache found" UserWarning here and in every Python process started from here.

    ``import paddle`` imports paddle.utils.cpp_extension, whose module-level
    ``find_ccache_home()`` warns when ccache is not on PATH: once per process
    that imports Paddle. Processes started with the 'spawn' method import it
    anew: paddle.distributed.spawn's trainers, and their DataLoader workers,
    which inherit the spawn start method and are started again every epoch, so
    the quickstart printed it dozens of times. A warnings filter does not reach
    those fresh interpreters, PYTHONWARNINGS does: this sets both. Call it
    before the program's first ``import paddle``.
    """
    warnings.filterwarnings('ignore', message=CCACHE_WARNING, category=UserWarning)
    spec = f'ignore:{CCACHE_WARNING}:UserWarning'
    current = [s for s in os.environ.get('PYTHONWARNINGS', '').split(',') if s]
    if spec not in current:
        os.environ['PYTHONWARNINGS'] = ','.join(current + [spec])


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises :class:`utils.errors.Terminated` (a KeyboardInterrupt) in the main thread.

    SIGTERM is what schedulers, ``docker stop``, ``timeout``, ``kill`` and
    paddle.distributed.launch (to each trainer's process group, on its own
    SIGTERM or Ctrl+C; SIGKILL 30 s later) send. Paddle's own handler for it
    (installed when Paddle initialises) ends the process at once: no interrupt
    checkpoint, and DataLoader workers left behind. Here the code stopped by
    Ctrl+C stops the same way: the exception unwinds the loop, which saves and
    ends its DataLoader (its workers with it). While that runs, a second
    SIGTERM is logged and ignored (it would cut the save short), and so is
    a DataLoader worker's exit (Paddle's SIGCHLD handler would raise: the
    launcher's SIGTERM reaches the workers of the trainer's process group
    too). The previous handlers are restored on leaving the block. Outside
    the main thread (where Python cannot set handlers) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = {}
    sigchld = getattr(signal, 'SIGCHLD', None)     # not on Windows

    def on_sigterm(signum, frame):
        if stopping:
            logger.warning('SIGTERM again: already stopping')
            return
        stopping['sigterm'] = signum
        if sigchld is not None:
            stopping['sigchld'] = signal.signal(sigchld, lambda *args: None)
        logger.warning('SIGTERM: stopping as after Ctrl+C')
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        if 'sigchld' in stopping:
            signal.signal(sigchld, stopping['sigchld'] if stopping['sigchld'] is not None else signal.SIG_DFL)


def local_process_count():
    """Training processes sharing this machine: 1, or what paddle.distributed.launch / spawn set up."""
    for var in ('PADDLE_LOCAL_SIZE', 'PADDLE_TRAINERS_NUM'):
        value = os.environ.get(var, '')
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


# MKL, Paddle's CPU GEMM (under every dygraph convolution and matmul), runs its generic kernels on
# a CPU that is not Intel's unless MKL_DEBUG_CPU_TYPE=5 tells it to use the AVX2 ones; the MKL in
# Paddle's wheels still reads that switch. On an AMD EPYC (2 cores, 1 thread, 2026-12-04) a 256->256
# 3x3 conv on [2, 256, 69, 69], forward and backward, takes 0.97 s without it, 0.44 s with it (PyTorch:
# 0.33 s), and a yolact_resnet50 training step 2.8x the reference's CPU time without it, 1.1x with it.
# MKL reads it at its first call, so it must be set before the process computes anything.
MKL_CPU_TYPE_VAR = 'MKL_DEBUG_CPU_TYPE'
MKL_AVX2 = '5'


def use_mkl_avx2_on_amd(cpuinfo_path='/proc/cpuinfo'):
    """Have MKL use its AVX2 kernels on an AMD CPU with AVX2; True when this call set it.

    Leaves a value the user set alone, and every other CPU (an Intel CPU
    picks its own kernels, AVX-512 ones included). Child processes (DataLoader
    workers, data-parallel trainers) inherit it through the environment.
    """
    if MKL_CPU_TYPE_VAR in os.environ:
        return False
    try:
        with open(cpuinfo_path, encoding='utf-8', errors='replace') as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    fields = {}
    for line in head.splitlines():
        if not line.strip():
            break  # the end of the first processor's block
        key, _, value = line.partition(':')
        fields[key.strip()] = value.strip()
    if fields.get('vendor_id') != 'AuthenticAMD' or 'avx2' not in fields.get('flags', '').split():
        return False
    os.environ[MKL_CPU_TYPE_VAR] = MKL_AVX2
    logger.info('AMD CPU with AVX2: MKL uses its AVX2 kernels (%s=%s)', MKL_CPU_TYPE_VAR, MKL_AVX2)
    return True


def select_device(device=None, cpu_threads=None):
    """Use ``device`` ('cpu', 'gpu', 'gpu:1', ...) or, when None, a GPU if there is one; returns its name.

    Call it before the first computation: it also switches MKL to its AVX2
    kernels on an AMD CPU (:func:`use_mkl_avx2_on_amd`).

    On CPU, dygraph operators get ``cpu_threads`` threads (default: the
    machine's cores shared evenly among the local training processes):
    importing paddle sets OMP_NUM_THREADS=1 when it is unset, which leaves all
    but one core idle, while more threads than cores, as N processes
    with a thread per core each would make, thrash.
    """
    import paddle

    use_mkl_avx2_on_amd()
    device = device or ('gpu' if paddle.device.cuda.device_count() > 0 else 'cpu')
    paddle.set_device(device)
    if device == 'cpu':
        paddle.base.core.set_num_threads(cpu_threads or default_cpu_threads())
    return device


def default_cpu_threads():
    """This machine's cores shared evenly among its local training processes (at least 1)."""
    return max(1, (os.cpu_count() or 1) // local_process_count())


def predictor_cpu_threads(num_threads=None):
    """CPU math threads of a Paddle Inference predictor: ``num_threads``, else as many as dygraph gets."""
    return num_threads or default_cpu_threads()


@contextlib.contextmanager
def dygraph_threads_restored(num_threads=None):
    """Around a Paddle Inference CPU run: set dygraph's thread count back afterwards.

    A CPU predictor run leaves this process's dygraph operators on one thread
    (Paddle 3.3.1), and Detect and postprocess run in dygraph next, slower on
    one thread. Paddle has no getter for the count, so
    it is restored to ``num_threads`` or, when None, default_cpu_threads
    (what select_device sets by default).
    """
    import paddle

    try:
        yield
    finally:
        paddle.base.core.set_num_threads(num_threads or default_cpu_threads())


# ------------------------------------------------------ DataLoader shared memory --
# Measured with data/coco.py's datasets and detection_collate for yolact_base
# (550 x 550 input): a training batch holds the float32 images [B, 3, S, S]
# (29,040,000 bytes at batch 8) and float32 masks [n, S, S] per image
# (1,210,000 bytes per object); an eval sample is one float32 image
# (3,630,032 bytes). Measured on shapes images resized to 550 (batches of 8 with
# 25 and 23 objects: 59,290,564 and 56,870,524 bytes, 64 and 4 bytes of that
# not images or masks). COCO train2017 has 7.3 objects per image
# (860,001 / 118,287), so a yolact_base batch of 8 is about 100 MB and an
# eval sample 3.6 MB.
COCO_OBJECTS_PER_IMAGE = 7.3
# Paddle's DataLoader keeps up to prefetch_factor (default 2) batches per
# worker in flight, each in its own shared-memory segment.
PREFETCH_FACTOR = 2
# Batches with twice the mean object count are common in COCO (crowded scenes).
SHM_MARGIN = 2.0
SHARED_MEMORY_SETTINGS = ('auto', 'on', 'off')


def training_batch_bytes(max_size, batch_size, objects_per_image=COCO_OBJECTS_PER_IMAGE):
    """Bytes of one collated training batch: float32 images [B, 3, S, S] and masks [n, S, S]."""
    return int(batch_size * (3 + objects_per_image) * max_size * max_size * 4)


def eval_sample_bytes(max_size):
    """Bytes of one evaluation sample: a float32 image [3, S, S]."""
    return 3 * max_size * max_size * 4


def shared_memory_free(path='/dev/shm'):
    """Free bytes in the shared-memory filesystem, or None where there is none (not Linux)."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def dataloader_shared_memory(num_workers, batch_bytes, setting='auto', shm_path='/dev/shm'):
    """Whether a paddle.io.DataLoader should pass batches through shared memory (``use_shared_memory``).

    'on' and 'off' force the answer. 'auto' uses shared memory only when
    ``shm_path`` has room for what the workers keep in flight:
    ``num_workers * PREFETCH_FACTOR * batch_bytes * SHM_MARGIN`` (yolact_base,
    batch 8, 4 workers: 1.6 GB; eval, 2 workers: 29 MB), since a worker that
    finds /dev/shm full dies with a bus error (Docker's and AI Studio's
    /dev/shm is 64 MB). Without workers shared memory is unused (False). The
    decision is logged; call this once per DataLoader.
    """
    if setting not in SHARED_MEMORY_SETTINGS:
        raise ConfigError(f"shared memory setting {setting!r}: use one of {', '.join(SHARED_MEMORY_SETTINGS)}")
    if num_workers <= 0:
        return False
    if setting != 'auto':
        logger.info('DataLoader shared memory %s (forced)', setting)
        return setting == 'on'
    free = shared_memory_free(shm_path)
    needed = int(num_workers * PREFETCH_FACTOR * batch_bytes * SHM_MARGIN)
    use = free is not None and free >= needed
    logger.info('DataLoader shared memory %s: %s has %s free, %d workers need %.0f MB',
                'on' if use else 'off', shm_path,
                'no space' if free is None else f'{free / 2**20:.0f} MB', num_workers, needed / 2**20)
    return use


# ------------------------------------------------------------ COCO zips --
def unpack_zips(zip_dir, dest, names):
    """Unpack the zips ``names`` of ``zip_dir`` into ``dest``; returns {name: 'unpacked' | 'present' | 'absent'}.

    Idempotent: a zip whose every file already exists in ``dest`` with its
    size is skipped ('present'). Otherwise it is extracted into a temporary
    folder inside ``dest`` (utils.files.staging_folder) and its entries renamed
    into place, so no file appears under its final name before it is complete (an interrupted run
    leaves only the temporary folder, removed the next time). Zips missing
    from ``zip_dir`` are 'absent'. Made for AI Studio's COCO dataset (data7122,
    :data:`data.coco_root.COCO_LAYOUT` names its zips) and a ``dest`` outside the
    ``data/`` folder that a restart resets.
    """
    os.makedirs(dest, exist_ok=True)
    status = {}
    for name in names:
        src = os.path.join(zip_dir, name)
        if not os.path.isfile(src):
            status[name] = 'absent'
            continue
        try:
            zf = zipfile.ZipFile(src)
        except zipfile.BadZipFile as e:
            raise DatasetError(f'{src}: not a readable zip ({e})') from e
        with zf:
            files = [i for i in zf.infolist() if not i.is_dir()]
            if all(_same_file(os.path.join(dest, i.filename), i.file_size) for i in files):
                status[name] = 'present'
                continue
            staging = f'.unpacking-{name}'
            for leftover in os.listdir(dest):
                if leftover.startswith(staging):    # of a killed run
                    shutil.rmtree(os.path.join(dest, leftover), ignore_errors=True)
            logger.info('unpacking %s (%d files) into %s', src, len(files), dest)
            with staging_folder(dest, staging, f'the files of {src}') as tmp:
                zf.extractall(tmp)
                for entry in sorted(os.listdir(tmp)):
                    _move_into(os.path.join(tmp, entry), os.path.join(dest, entry))
        status[name] = 'unpacked'
    return status


def _same_file(path, size):
    try:
        return os.path.getsize(path) == size
    except OSError:
        return False


def _move_into(src, dst):
    """Rename ``src`` to ``dst``; a folder whose destination exists (annotations/ of two zips) is merged."""
    if os.path.isdir(src) and os.path.isdir(dst):
        for entry in os.listdir(src):
            _move_into(os.path.join(src, entry), os.path.join(dst, entry))
    elif os.path.isdir(dst):
        shutil.rmtree(dst)
        os.rename(src, dst)
    else:
        os.replace(src, dst)
