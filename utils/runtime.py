"""Process-wide device selection and CPU thread setup shared by the programs."""
import contextlib
import os

import paddle


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
    try:
        yield
    finally:
        paddle.base.core.set_num_threads(num_threads or default_cpu_threads())
