"""utils/training/logger.py: the console line's ETA and loss columns."""
import logging

from utils.training.logger import TrainingLogger

LOSSES = {'loss_box': 1.0, 'loss_conf': 2.0, 'loss_mask': 3.0, 'loss_segm': 0.5}


def _lines(tmp_path, caplog, max_iter, times):
    """The console lines of iterations 0.. with the given iteration times (a line every 2 iterations)."""
    log = TrainingLogger(str(tmp_path), max_iter=max_iter, start_iter=0, log_interval=2)
    with caplog.at_level(logging.INFO, logger='utils.training.logger'):
        for iteration, elapsed in enumerate(times):
            log.log_iteration(0, iteration, LOSSES, lr=1e-3, elapsed=elapsed)
    log.close()
    return [r.getMessage() for r in caplog.records]


def test_eta_is_unknown_before_an_iteration_is_timed_and_counts_the_time_left(tmp_path, caplog):
    # Iteration 0 (graph set-up, first batch) is left out of the average: no estimate yet.
    first, second = _lines(tmp_path, caplog, max_iter=100, times=[15.0, 2.0, 2.0])
    assert 'ETA: - ||' in first
    assert 'ETA: 0:03:16 ||' in second          # 98 iterations left at 2 s each


def test_the_last_line_shows_no_zero_eta(tmp_path, caplog):
    lines = _lines(tmp_path, caplog, max_iter=4, times=[1.0, 0.1, 0.1, 0.1, 0.1])
    assert 'ETA: 0:00:01 ||' in lines[1]         # 0.2 s left rounds up, never down to 0:00:00
    assert 'ETA: - ||' in lines[2] and not any('0:00:00' in line for line in lines)


def test_loss_columns_use_the_reference_letters(tmp_path, caplog):
    line = _lines(tmp_path, caplog, max_iter=10, times=[1.0])[0]
    assert '|| B: 1.000 | C: 2.000 | M: 3.000 | S: 0.500 | T: 6.500 ||' in line
