"""Dataset evaluation: stream detections into COCO results files, score them with COCOeval; benchmark.

Images are decoded and preprocessed by DataLoader workers while the network
runs; each image's detections are RLE-encoded and appended to the results
files right after post-processing, so memory does not grow with the dataset.
Unreadable images are skipped, named in the log and counted in the summary.
"""
import dataclasses
import logging
import queue
import threading
import time

import numpy as np
import paddle
from tqdm import tqdm

from data.coco import check_batches, eval_collate
from utils.visual import plots
from utils.evaluation import coco_eval
from utils.errors import DatasetError, OutputError
from utils.files import check_writable_folder
from utils.runtime import dataloader_shared_memory, eval_sample_bytes

logger = logging.getLogger(__name__)

# The reference skips the first iterations in its FPS: they include one-time setup.
WARMUP_ITERATIONS = 2


@dataclasses.dataclass
class EvalSummary:
    """What a dataset evaluation did.

    results: {'bbox'|'segm': {metric: value}} (COCOeval fractions) or None when
    mAP was not computed; per_class: utils.evaluation.coco_eval.CocoScores.per_class (or
    None); image_ids: the images scored; skipped: ids of unreadable images;
    files: {'bbox'|'segm': results file}; log_path: the saved table;
    plot_path: the per-class AP and precision-recall PNG beside it;
    seconds: wall time of the image loop.
    """
    results: dict
    per_class: list
    image_ids: list
    skipped: list
    files: dict
    log_path: str
    plot_path: str
    seconds: float


def _reference_hash(image_id):
    """The reference eval.py's integer hash of an image id, for a deterministic image order."""
    x = (((image_id >> 16) ^ image_id) * 0x045d9f3b) & 0xFFFFFFFF
    x = (((x >> 16) ^ x) * 0x045d9f3b) & 0xFFFFFFFF
    return ((x >> 16) ^ x) & 0xFFFFFFFF


def evaluation_order(image_ids, max_images=-1):
    """Dataset indices in the reference's evaluation order, cut to ``max_images`` (-1: all).

    The reference sorts images by a hash of their id, so --max_images takes
    the same subset in every run and Python version.
    """
    order = sorted(range(len(image_ids)), key=lambda i: _reference_hash(int(image_ids[i])))
    return order if max_images < 0 else order[:max_images]


def _loader(dataset, indices, num_workers, max_size, shared_memory='auto'):
    """A DataLoader yielding one (img tensor [3, S, S], image_id, height, width, ok) at a time.

    shared_memory: 'auto', 'on' or 'off', see utils.runtime.dataloader_shared_memory (S = max_size).

    An image that fails for another reason than being unreadable (ok=False) stops it with a
    DatasetError naming the image (data.coco.check_batches).
    """
    return check_batches(paddle.io.DataLoader(paddle.io.Subset(dataset, indices), batch_size=1, shuffle=False,
                                              num_workers=num_workers, collate_fn=eval_collate,
                                              use_shared_memory=dataloader_shared_memory(
                                                  num_workers, eval_sample_bytes(max_size), shared_memory)))


class BackgroundWriter:
    """Encodes and appends detections (RLE, JSON) in a thread while the caller runs the next image.

    ``add(...)`` takes CocoResultsWriter.add's arguments and returns at once
    unless ``max_pending`` images wait already (memory stays flat: full-size
    masks of at most that many images are held); ``waited`` is the total time
    ``add`` blocked, i.e. the network waited on the host. Records are written
    in ``add`` order, so the files are byte-identical to writing in the loop.
    An error in the thread (disk full, ...) is raised by the next ``add`` or by ``close``.
    """

    def __init__(self, writer, max_pending=4):
        self.writer = writer
        self.waited = 0.0
        self._queue = queue.Queue(maxsize=max_pending)
        self._error = None
        self._thread = threading.Thread(target=self._run, name='coco-results-writer', daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self.writer.add(*item)
                except BaseException as err:  # handed to the caller, which raises it
                    self._error = err

    def add(self, *detections):
        """Queue one image's detections (see CocoResultsWriter.add)."""
        self._raise_error()
        start = time.perf_counter()
        self._queue.put(detections)
        self.waited += time.perf_counter() - start

    def close(self):
        """Wait until everything queued is written; raise the thread's error if there was one."""
        self._queue.put(None)
        self._thread.join()
        self._raise_error()

    def _raise_error(self):
        if self._error is not None:
            raise self._error


def evaluate(predictor, dataset, results_dir, max_images=-1, num_workers=2, compute_map=True, log_dir='logs',
             progress=True, background=True, shared_memory='auto', class_filter=None):
    """Run a dataset and stream its detections into COCO results files; optionally score them.

    Args:
        predictor: a utils.predictor.Predictor (network, Detect, post-processing, config).
        dataset: a data.coco.COCOEvalImages over ``predictor.cfg.dataset`` (its ``coco``
            is the ground truth when ``compute_map``).
        results_dir: where bbox_detections.json and mask_detections.json go.
        max_images: at most this many images (-1: all), see :func:`evaluation_order`.
        compute_map: run COCOeval on the files written (needs ground truth);
            the tables (overall and per class) are printed, logged and saved
            under ``log_dir`` with a PNG of per-class AP and precision-recall curves.
        background: RLE-encode and write image i's detections in a thread
            while the network runs image i+1 (:class:`BackgroundWriter`);
            False does it in the loop (same files, byte for byte).
        shared_memory: the DataLoader's, see :func:`_loader`.
        class_filter: 0-based classes to keep (None: all); the others are
            neither written nor scored.
    Returns:
        an :class:`EvalSummary`.
    """
    cfg = predictor.cfg
    if compute_map:
        # Checked before the images are run, not when the tables are written.
        check_writable_folder(log_dir, 'evaluation logs (--log_dir)')
    indices = evaluation_order(dataset.ids, max_images)
    class_to_cat = coco_eval.class_to_category(cfg.dataset.label_map_dict())
    if class_filter is not None:
        class_to_cat = {c: cat for c, cat in class_to_cat.items() if c in set(class_filter)}
    scored, skipped = [], []
    start = time.perf_counter()
    with coco_eval.CocoResultsWriter(results_dir, class_to_cat) as writer, \
            tqdm(total=len(indices), unit='img', desc='Evaluating', disable=not progress) as bar:
        sink = BackgroundWriter(writer) if background else writer
        try:
            for img, image_id, height, width, ok in _loader(dataset, indices, num_workers, cfg.max_size,
                                                             shared_memory):
                bar.update()
                if not ok:
                    # The worker logged the file and the reason.
                    skipped.append(int(image_id))
                    bar.set_postfix(skipped=len(skipped))
                    continue
                out = predictor.predict_preprocessed(img.unsqueeze(0), width, height)
                sink.add(image_id, out['classes'], out['boxes'], out['scores'], out['masks'],
                         out.get('mask_scores'))
                scored.append(int(image_id))
        finally:
            if background:
                sink.close()
    seconds = time.perf_counter() - start
    files = {'bbox': writer.bbox_path, 'segm': writer.mask_path}
    waited = f'; the network waited {sink.waited:.1f} s on the results writer' if background else ''
    logger.info('%d images in %.1f s (%.2f img/s%s); %d detections written to %s and %s', len(scored), seconds,
                len(scored) / max(seconds, 1e-9), waited, writer.num_detections, *files.values())
    if skipped:
        logger.warning('%d unreadable image(s) skipped and not scored (ids %s)', len(skipped),
                       ', '.join(map(str, skipped[:20])) + (' ...' if len(skipped) > 20 else ''))

    results = per_class = log_path = plot_path = None
    if compute_map:
        # The model's classes only: with a subset of the file's categories the
        # others have no detections and would each count as AP 0.
        categories = sorted(class_to_cat.values())
        scores = coco_eval.evaluate_coco(dataset.coco, files, image_ids=scored, category_ids=categories)
        results, per_class = scores.metrics, scores.per_class
        others = len(set(dataset.coco.getCatIds()) - set(categories))
        logger.info('mAP (COCOeval, %d images, %d categories%s) of %s:\n%s\n%s', len(scored), len(categories),
                    f'; {others} other categories of the file not scored' if others else '', cfg.name,
                    coco_eval.format_table(results), coco_eval.format_per_class_table(per_class))
        try:
            log_path = coco_eval.eval_log_path(log_dir, cfg.name)
            plot_path = plots.plot_per_class(scores, log_path[:-len('.json')] + '_per_class.png',
                                             title=f'{cfg.name} on {cfg.dataset.name}, {len(scored)} images')
            coco_eval.write_eval_log(
                scores, log_path, config=cfg.name, dataset=cfg.dataset.name,
                annotations=cfg.dataset.valid_info, num_images=len(scored), skipped=skipped,
                image_ids=scored, category_ids=categories, result_files=files, per_class_plot=plot_path)
        except OSError as err:
            raise OutputError(f'cannot write the evaluation log to {log_dir}: {err.strerror or err}; the tables '
                              f'are printed above and the results files kept ({", ".join(files.values())})') from err
        logger.info('saved %s and %s', log_path, plot_path)
    return EvalSummary(results, per_class, scored, skipped, files, log_path, plot_path, seconds)


def benchmark(predictor, dataset, max_images=-1, num_workers=2, progress=True, shared_memory='auto'):
    """Per-stage times over dataset images, as the reference's --benchmark (nothing is written).

    Returns {stage: mean seconds} for 'data' (waiting for the next decoded and
    preprocessed image), 'network', 'detect', 'postprocess' and 'total', over
    the images after the first WARMUP_ITERATIONS.
    """
    net, cfg = predictor.net, predictor.cfg
    indices = evaluation_order(dataset.ids, max_images)
    times = {k: [] for k in ('data', 'network', 'detect', 'postprocess', 'total')}
    loader = iter(_loader(dataset, indices, num_workers, cfg.max_size, shared_memory))
    with paddle.no_grad():
        for it in tqdm(range(len(indices)), unit='img', desc='Benchmark', disable=not progress):
            t0 = time.perf_counter()
            img, _, height, width, ok = next(loader)
            if not ok:
                continue
            t1 = time.perf_counter()
            preds = net(img.unsqueeze(0))
            _synchronize()
            t2 = time.perf_counter()
            det = predictor.detect(preds)[0]
            _synchronize()
            t3 = time.perf_counter()
            predictor.finish(det, width, height)
            t4 = time.perf_counter()
            if it >= WARMUP_ITERATIONS:
                for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                    times[key].append(value)
    if not times['total']:
        raise DatasetError(f'--benchmark needs more than {WARMUP_ITERATIONS} readable images')
    means = {k: float(np.mean(v)) for k, v in times.items()}
    logger.info('benchmark of %s over %d images (after %d warm-up):\n%s\nAverage: %.2f fps, %.1f ms',
                cfg.name, len(times['total']), WARMUP_ITERATIONS,
                '\n'.join(f'  {k:<12} {1000 * v:8.1f} ms' for k, v in means.items()),
                1 / means['total'], 1000 * means['total'])
    return means


def _synchronize():
    """Wait for queued GPU work so that stage times are real (no-op on CPU)."""
    if paddle.device.is_compiled_with_cuda() and 'gpu' in paddle.device.get_device():
        paddle.device.synchronize()
