"""Detections drawn on an image, a folder of images or a video (file or camera).

``ImageDetector`` turns a BGR image into a drawn BGR image with a
``utils.predictor.Predictor``, and can hand every image's detections to a
``utils.evaluation.results.InferenceResults`` (COCO results, labelme files);
``eval_image``, ``eval_images`` and ``eval_video`` feed it and write or show the result.
"""
import logging
import os
import queue
import threading

import cv2
import paddle
from tqdm import tqdm

from data.images import DEFAULT_MAX_PIXELS, check_pixels, read_image
from utils.visual.drawing import draw_detections
from utils.errors import ConfigError, MissingFileError, OutputError, UnreadableFileError, YolactError
from utils.evaluation.results import keep_classes

logger = logging.getLogger(__name__)

# Frames decoded ahead of the network in video mode.
VIDEO_QUEUE_SIZE = 8
ESCAPE_KEY = 27


def split_io_spec(spec, what):
    """'IN[:OUT]' -> (IN, OUT or None), where IN exists (a path may itself contain ':').

    Camera indices (digits) are accepted as IN for videos.
    """
    if os.path.exists(spec) or (what == 'video' and spec.isdigit()):
        return spec, None
    for i, char in enumerate(spec):
        if char == ':' and (os.path.exists(spec[:i]) or (what == 'video' and spec[:i].isdigit())):
            return spec[:i], spec[i + 1:] or None
    raise MissingFileError(f'--{what}: input {spec.split(":")[0]!r} not found (expected IN[:OUT])')


class ImageDetector:
    """BGR image in, drawn BGR image out, through a utils.predictor.Predictor.

    Args:
        predictor: the Predictor.
        max_drawn: draw at most ``max_drawn`` detections (only their masks are assembled), those above the
            predictor's score threshold.
        class_color: one colour per class (videos: stable from frame to frame) instead of per detection.
        results: a utils.evaluation.results.InferenceResults receiving every detection of each image (not only
            the max_drawn drawn), or None.
        class_filter: 0-based classes to keep (None: all); the others are neither drawn nor recorded.
        **draw_options: utils.visual.drawing.draw_detections's draw_masks, draw_boxes, draw_text, draw_scores.
    """

    def __init__(self, predictor, max_drawn=5, class_color=False, results=None, class_filter=None, **draw_options):
        self.predictor = predictor
        self.max_drawn = max_drawn
        self.class_color = class_color
        self.results = results
        self.class_filter = class_filter
        self.draw_options = draw_options

    @paddle.no_grad()
    def detect(self, image, source=None, frame=None):
        """The detections of one image (Predictor.__call__'s dict), recorded in ``results``.

        source: the image's path, or the video's (with ``frame``, the frame index), for ``results``.
        """
        # Only what is drawn needs assembling, unless every detection is recorded or some are filtered out.
        every = self.results is not None or self.class_filter is not None
        out = self.predictor(image, max_num_detections=None if every else self.max_drawn)
        if self.class_filter is not None:
            out = keep_classes(out, self.class_filter)
        if self.results is not None:
            self.results.add(out, image.shape[0], image.shape[1], source, frame)
        return out

    def __call__(self, image, source=None, frame=None):
        """The drawn image (see :meth:`detect` for the arguments)."""
        out = self.detect(image, source, frame)
        return draw_detections(image, out['classes'], out['scores'], out['boxes'], out['masks'], out['labels'],
                               max_drawn=self.max_drawn, class_color=self.class_color, **self.draw_options)


def _write_image(path, image):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise MissingFileError(f'output folder does not exist: {folder}')
    if not cv2.imwrite(path, image):
        raise OutputError(f'cannot write image {path!r} (unwritable, or an extension OpenCV does not know)')


def _show(title, image, wait_ms):
    """Show an image in a window; returns the key pressed. A clear error without a display."""
    try:
        cv2.imshow(title, image)
        return cv2.waitKey(wait_ms)
    except cv2.error as e:
        raise YolactError('cannot open a window here (no display?); give an output path, IN:OUT') from e


def eval_image(detector, in_path, out_path=None, show=True, max_pixels=DEFAULT_MAX_PIXELS):
    """Detect in one image; write the drawing to ``out_path`` or show it (unless not ``show``).

    An image that cannot be read, or above ``max_pixels`` (data.images.read_image),
    is an UnreadableFileError naming it.
    """
    image = read_image(in_path, max_pixels=max_pixels)
    if out_path is None and not show:
        detector.detect(image, in_path)
        return
    drawn = detector(image, in_path)
    if out_path is None:
        _show(in_path, drawn, 0)
    else:
        _write_image(out_path, drawn)
        logger.info('%s -> %s', in_path, out_path)


def output_names(names):
    """{input file name: drawing file name}: ``<stem>.png``, or ``<name>.png`` for inputs sharing a stem.

    ``x.jpg`` and ``x.png`` would both draw to ``x.png``; they become
    ``x.jpg.png`` and ``x.png.png`` instead. Stems are compared
    case-insensitively (``X.jpg``, ``x.png`` collide on Windows and macOS).
    Raises ConfigError if two drawings would still share a name.
    """
    by_stem = {}
    for name in names:
        by_stem.setdefault(os.path.splitext(name)[0].lower(), []).append(name)
    out = {}
    for group in by_stem.values():
        for name in group:
            out[name] = (os.path.splitext(name)[0] if len(group) == 1 else name) + '.png'
    seen = {}
    for name, drawn in out.items():
        other = seen.setdefault(drawn.lower(), name)
        if other != name:
            raise ConfigError(f'--images: {other} and {name} would both be drawn to {drawn}; rename one')
    return out


def eval_images(detector, in_dir, out_dir, progress=True, max_pixels=DEFAULT_MAX_PIXELS):
    """Detect in every file of ``in_dir`` (sorted); drawings go to ``out_dir/<stem>.png`` (None: no drawings).

    Inputs sharing a stem are drawn to ``<name>.png`` (:func:`output_names`);
    a drawing never replaces one of the inputs (ConfigError). Unreadable files,
    and images above ``max_pixels`` (data.images.read_image), are skipped with a
    warning naming them. Returns (written paths, skipped input paths).
    """
    if not os.path.isdir(in_dir):
        raise MissingFileError(f'--images: {in_dir!r} is not a folder')
    try:
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise OutputError(f'cannot create output folder {out_dir!r}: {e.strerror}') from e
    names = sorted(n for n in os.listdir(in_dir) if os.path.isfile(os.path.join(in_dir, n)))
    drawn_names = output_names(names)
    renamed = [f'{n} -> {d}' for n, d in drawn_names.items() if d != os.path.splitext(n)[0] + '.png']
    if renamed:
        logger.info('inputs sharing a name are drawn under their full names: %s', ', '.join(renamed))
    if out_dir is not None and os.path.samefile(in_dir, out_dir):
        for name, drawn in drawn_names.items():
            if drawn in drawn_names:
                raise ConfigError(f'--images: the drawing of {name} would replace the input '
                                  f'{os.path.join(in_dir, drawn)}; give another output folder')
    written, skipped = [], []
    for name in tqdm(names, unit='img', desc='Images', disable=not progress):
        in_path = os.path.join(in_dir, name)
        try:
            image = read_image(in_path, max_pixels=max_pixels)
        except OSError as e:
            logger.warning('skipping %s', e)
            skipped.append(in_path)
            continue
        if out_dir is None:
            detector.detect(image, in_path)
            continue
        out_path = os.path.join(out_dir, drawn_names[name])
        _write_image(out_path, detector(image, in_path))
        written.append(out_path)
    logger.info('%d images, %d drawn%s%s', len(names) - len(skipped), len(written),
                f' in {out_dir}' if out_dir else '', f'; {len(skipped)} unreadable file(s) skipped' if skipped else '')
    return written, skipped


def _read_frames(capture, frames, stop):
    """Decode frames into the queue until the video ends (None marks the end) or ``stop`` is set."""
    while not stop.is_set():
        ok, frame = capture.read()
        frames.put(frame if ok else None)
        if not ok:
            return


def eval_video(detector, source, out_path=None, progress=True, show=True, max_pixels=DEFAULT_MAX_PIXELS):
    """Detect in a video file or camera; write an mp4 to ``out_path`` or show the frames (Esc stops;
    without ``show``, the frames are only detected, for the detector's results).

    Frames are decoded in a background thread while the network runs. A frame
    size above ``max_pixels`` (the cap of data.images.read_image) is refused
    before the first frame is decoded. Returns the number of frames processed.
    """
    try:
        capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
    except cv2.error as err:    # OpenCV 5 raises where OpenCV 4 returns a closed capture
        raise UnreadableFileError(f'cannot open video {source!r}: {str(err).strip()}') from None
    if not capture.isOpened():
        raise UnreadableFileError(f'cannot open video {source!r} (missing file, unsupported codec or no such camera)')
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    width = round(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = round(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    total = round(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    try:
        check_pixels(width, height, max_pixels, f'video {source!r}')
    except UnreadableFileError:
        capture.release()
        raise
    writer = None
    if out_path is not None:
        folder = os.path.dirname(os.path.abspath(out_path))
        if not os.path.isdir(folder):
            capture.release()
            raise MissingFileError(f'output folder does not exist: {folder}')
        writer = cv2.VideoWriter(out_path, cv2.VideoWriter_fourcc(*'mp4v'), fps, (width, height))
        if not writer.isOpened():
            capture.release()
            raise OutputError(f'cannot write video {out_path!r} (unwritable path or unsupported container)')

    frames, stop = queue.Queue(maxsize=VIDEO_QUEUE_SIZE), threading.Event()
    reader = threading.Thread(target=_read_frames, args=(capture, frames, stop), daemon=True)
    reader.start()
    count = 0
    try:
        with tqdm(total=total if total > 0 else None, unit='frame', desc='Video', disable=not progress) as bar:
            while True:
                frame = frames.get()
                if frame is None:
                    break
                if writer is None and not show:
                    detector.detect(frame, source, count)
                else:
                    drawn = detector(frame, source, count)
                    if writer is not None:
                        writer.write(drawn)
                    elif _show(str(source), drawn, 1) == ESCAPE_KEY:
                        break
                count += 1
                bar.update()
    except KeyboardInterrupt:
        logger.info('stopped after %d frames', count)
    finally:
        stop.set()
        # Unblock the reader if it waits on a full queue, then let it finish.
        while reader.is_alive():
            try:
                frames.get_nowait()
            except queue.Empty:
                reader.join(timeout=0.1)
        capture.release()
        if writer is not None:
            writer.release()
        elif show:
            cv2.destroyAllWindows()
    logger.info('%d frames%s', count, f' written to {out_path}' if out_path else '')
    return count
