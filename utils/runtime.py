"""Process-wide settings shared by the programs: device selection, CPU threads, Paddle's import warning.

Paddle is imported inside the functions so that :func:`quiet_paddle_import`
can run before the program's first ``import paddle``.
"""
import contextlib
import os
import warnings

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


def local_process_count():
    """Training processes sharing this machine: 1, or what paddle.distributed.launch / spawn set up."""
    for var in ('PADDLE_LOCAL_SIZE', 'PADDLE_TRAINERS_NUM'):
        value = os.environ.get(var, '')
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def select_device(device=None, cpu_threads=None):
    """Use ``device`` ('cpu', 'gpu', 'gpu:1', ...) or, when None, a GPU if there is one; returns its name.

    On CPU, dygraph operators get ``cpu_threads`` threads (default: the
    machine's cores shared evenly among the local training processes):
    importing paddle sets OMP_NUM_THREADS=1 when it is unset, which leaves all
    but one core idle (yolact_base eval forward on 2 cores: 1.79 s with one
    thread, 1.29 s with two), while more threads than cores, as N processes
    with a thread per core each would make, thrash.
    """
    import paddle

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
    (Paddle 3.3.1), and Detect and postprocess run in dygraph next (68 ms
    instead of 57 ms for yolact_base). Paddle has no getter for the count, so
    it is restored to ``num_threads`` or, when None, default_cpu_threads
    (what select_device sets by default).
    """
    import paddle

    try:
        yield
    finally:
        paddle.base.core.set_num_threads(num_threads or default_cpu_threads())
