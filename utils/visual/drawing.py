"""Drawing detections on images: masks, boxes, class names and scores.

Follows the reference's ``prep_display``: the first ``max_drawn`` detections above
the score threshold are drawn; mask colours blend with alpha 0.45 and the
highest-scoring detection ends up on top; a 1 px box and a filled label with
``class: score`` in white. Colours come from ``data.config.COLORS``, chosen
per instance (``index * 5``, images) or per class (``class * 5``, videos).
"""
import cv2
import numpy as np

from data.config import COLORS

FONT = cv2.FONT_HERSHEY_DUPLEX
FONT_SCALE = 0.6
FONT_THICKNESS = 1


def detection_color(index):
    """BGR colour for a detection or class index, as the reference picks it."""
    r, g, b = COLORS[(index * 5) % len(COLORS)]
    return b, g, r


def num_to_draw(scores, max_drawn, score_threshold):
    """How many leading detections to draw: at most max_drawn, stopping at the first
    score under the threshold (scores are sorted, highest first)."""
    n = min(max_drawn, len(scores))
    below = np.nonzero(np.asarray(scores[:n]) < score_threshold)[0]
    return int(below[0]) if below.size else n


def draw_detections(image, classes, scores, boxes, masks, labels, max_drawn=5, score_threshold=0.0,
                    draw_masks=True, draw_boxes=True, draw_text=True, draw_scores=True,
                    class_color=False, mask_alpha=0.45):
    """Draw detections on a copy of an image.

    Args:
        image: [H, W, 3] uint8 BGR (as cv2 reads it).
        classes: [N] int, 0-based class indices; scores: [N], highest first.
        boxes: [N, 4] int pixel (x1, y1, x2, y2) in ``image``.
        masks: [N, H, W] 0/1 masks of the image size, or None.
        labels: [N] class names of the detections (Predictor's 'labels').
        max_drawn, score_threshold: draw at most ``max_drawn`` detections with a score
            of at least ``score_threshold``.
        class_color: one colour per class (True) or per detection (False).

    Returns:
        [H, W, 3] uint8 BGR image.
    """
    n = num_to_draw(scores, max_drawn, score_threshold)
    colors = [detection_color(int(classes[j]) if class_color else j) for j in range(n)]

    if draw_masks and masks is not None and n > 0:
        # Blend from the last detection to the first so the best one is on top;
        # in [0, 1] floats and truncated back to uint8 as the reference does.
        canvas = image.astype(np.float32) / 255.0
        for j in reversed(range(n)):
            inside = np.asarray(masks[j]) > 0.5
            color = np.asarray(colors[j], dtype=np.float32) / 255.0
            canvas[inside] = canvas[inside] * (1 - mask_alpha) + color * mask_alpha
        out = (canvas * 255).astype(np.uint8)
    else:
        out = image.copy()

    if draw_boxes or draw_text:
        for j in reversed(range(n)):
            x1, y1, x2, y2 = (int(v) for v in boxes[j])
            if draw_boxes:
                cv2.rectangle(out, (x1, y1), (x2, y2), colors[j], 1)
            if draw_text:
                name = labels[j]
                text = f'{name}: {float(scores[j]):.2f}' if draw_scores else name
                (text_w, text_h), _ = cv2.getTextSize(text, FONT, FONT_SCALE, FONT_THICKNESS)
                cv2.rectangle(out, (x1, y1), (x1 + text_w, y1 - text_h - 4), colors[j], -1)
                cv2.putText(out, text, (x1, y1 - 3), FONT, FONT_SCALE, (255, 255, 255),
                            FONT_THICKNESS, cv2.LINE_AA)
    return out
