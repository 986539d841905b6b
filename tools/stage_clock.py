"""Per-stage timing for tools/benchmark.py --train and its reference child (tools/reference_train_step.py).

Imports nothing of the project: the child runs with the reference checkout's packages
(``data``, ``layers``, ``utils``), which share their names with ours.
"""
import time


class StageClock:
    """Wall and process CPU time of named stages: ``with clock('forward'): ...``; results in ``times``.

    CPU time (all threads of this process) is the steadier measure on a
    shared machine: other processes' load stretches wall time, not it.
    """

    def __init__(self):
        self.times = {'wall': {}, 'cpu': {}}
        self._stage = None

    def __call__(self, stage):
        self._stage = stage
        return self

    def __enter__(self):
        self._start = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        self.times['wall'][self._stage] = time.perf_counter() - self._start[0]
        self.times['cpu'][self._stage] = time.process_time() - self._start[1]
