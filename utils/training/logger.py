"""Training progress: VisualDL scalars and the reference's console line with ETA.

Scalars go to ``<log_folder>/vdlrecords.*.log`` (``visualdl --logdir <log_folder>``):
``train/<loss term>``, ``train/loss_total``, ``train/lr`` and ``train/iter_time``
(seconds) every iteration, ``val/<metric>`` after each validation.
"""
import collections
import datetime
import logging
import math

from visualdl import LogWriter

logger = logging.getLogger(__name__)

# Console abbreviations of the loss terms, as the reference prints them.
LOSS_LABELS = {'loss_box': 'B', 'loss_conf': 'C', 'loss_mask': 'M', 'loss_segm': 'S', 'loss_maskiou': 'I'}


class MovingAverage:
    """Mean of the last ``window`` values added."""

    def __init__(self, window):
        self.values = collections.deque(maxlen=window)

    def add(self, value):
        self.values.append(value)

    def get(self):
        return sum(self.values) / len(self.values) if self.values else 0.0


class TrainingLogger:
    """Per-iteration scalars to VisualDL and, every ``log_interval`` iterations, a console line.

    The console line is the reference's: epoch, iteration, each loss term and
    their total averaged over the last ``window`` iterations, the ETA to
    ``max_iter`` from the average iteration time, the last iteration's time,
    plus the learning rate.

    Args:
        log_folder: VisualDL log directory.
        max_iter: last iteration, for the ETA.
        start_iter: first iteration of this run; its time (graph set-up,
            first data load) is left out of the ETA average, as in the reference.
        log_interval: iterations between console lines.
        window: iterations averaged for the console losses.
    """

    def __init__(self, log_folder, max_iter, start_iter=0, log_interval=10, window=100):
        self.writer = LogWriter(logdir=log_folder)
        self.max_iter = max_iter
        self.start_iter = start_iter
        self.log_interval = log_interval
        self.loss_avgs = collections.defaultdict(lambda: MovingAverage(window))
        self.time_avg = MovingAverage(window)

    def log_iteration(self, epoch, iteration, losses, lr, elapsed):
        """Record one finished iteration.

        Args:
            losses: {term name: float} (the loss dict's terms, e.g. 'loss_box').
            lr: the learning rate used.
            elapsed: wall time of the iteration in seconds.
        """
        total = sum(losses.values())
        for name, value in losses.items():
            self.writer.add_scalar(f'train/{name}', value, iteration)
            self.loss_avgs[name].add(value)
        self.writer.add_scalar('train/loss_total', total, iteration)
        self.writer.add_scalar('train/lr', lr, iteration)
        self.writer.add_scalar('train/iter_time', elapsed, iteration)
        if iteration != self.start_iter:
            self.time_avg.add(elapsed)
        if iteration % self.log_interval == 0:
            left = (self.max_iter - iteration) * self.time_avg.get()   # 0 until an iteration is timed
            eta = datetime.timedelta(seconds=math.ceil(left)) if left > 0 else '-'
            terms = ' |'.join(f' {LOSS_LABELS.get(name, name)}: {self.loss_avgs[name].get():.3f}'
                              for name in losses)
            avg_total = sum(self.loss_avgs[name].get() for name in losses)
            logger.info('[%3d] %7d ||%s | T: %.3f || ETA: %s || timer: %.3f || lr: %.2e',
                        epoch, iteration, terms, avg_total, eta, elapsed, lr)

    def log_validation(self, iteration, metrics):
        """Record validation results ({name: float}); negative values (COCOeval's "no such objects") are left out."""
        for name, value in metrics.items():
            if value >= 0:
                self.writer.add_scalar(f'val/{name}', value, iteration)

    def close(self):
        self.writer.close()
