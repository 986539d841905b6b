"""The per-class AP and precision-recall figure of an evaluation (a PNG beside its log).

Drawn with matplotlib's object interface on the Agg canvas: no pyplot, so no
global figure state and no display is needed (a server, a notebook kernel).
"""
import io
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Legends list the classes only up to this many; beyond it the curves are unlabelled.
MAX_LEGEND = 12
KIND_LABELS = {'bbox': 'box', 'segm': 'mask'}


def plot_per_class(scores, path, title=''):
    """Write ``path`` (PNG): per-class AP bars and, per IoU type, precision-recall curves per class.

    scores: a utils.evaluation.coco_eval.CocoScores. The bars are AP at IoU 0.5:0.95 (box
    and mask side by side; classes without ground truth are left out); the
    curves are COCOeval's interpolated precision at IoU 0.5 against recall,
    all areas, 100 detections per image. Written to a temporary file and
    renamed, so ``path`` is never half-written. Returns ``path``.
    """
    kinds = [k for k in ('bbox', 'segm') if k in scores.precision]
    rows = [r for r in scores.per_class if any(r.get(k, -1) >= 0 for k in kinds)]
    bar_height = max(3.0, 0.28 * len(rows) * len(kinds) + 1.2)
    fig = Figure(figsize=(5.5 + 4.5 * len(kinds), bar_height), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + len(kinds), squeeze=False)[0]

    bars = axes[0]
    y = np.arange(len(rows))
    step = 0.8 / max(len(kinds), 1)
    for i, kind in enumerate(kinds):
        values = [100 * max(r.get(kind, -1), 0) for r in rows]
        bars.barh(y + (i - (len(kinds) - 1) / 2) * step, values, height=step, label=f'{KIND_LABELS[kind]} AP')
    bars.set_yticks(y)
    bars.set_yticklabels([r['name'] for r in rows])
    bars.invert_yaxis()
    bars.set_xlim(0, 100)
    bars.set_xlabel('AP (IoU 0.5:0.95), %')
    bars.set_title('per-class AP')
    if kinds:
        bars.legend(loc='lower right')

    iou50 = int(np.argmin(np.abs(scores.iou_thresholds - 0.5))) if scores.iou_thresholds.size else 0
    by_id = {r['category_id']: k for k, r in enumerate(scores.per_class)}
    for ax, kind in zip(axes[1:], kinds):
        for row in rows:
            curve = scores.precision[kind][iou50, :, by_id[row['category_id']]]
            if (curve > -1).any():
                ax.plot(scores.recall_thresholds, np.where(curve > -1, curve, np.nan), linewidth=1.2,
                        label=row['name'])
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel('recall')
        ax.set_ylabel('precision')
        ax.set_title(f'{KIND_LABELS[kind]} precision-recall, IoU 0.5')
        ax.grid(alpha=0.3)
        if 0 < len(rows) <= MAX_LEGEND:
            ax.legend(loc='lower left', fontsize='small')
    if title:
        fig.suptitle(title)
    fig.tight_layout()

    buffer = io.BytesIO()
    fig.savefig(buffer, format='png')
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f'.{name}.{os.getpid()}.tmp')
    try:
        with open(tmp, 'wb') as f:
            f.write(buffer.getvalue())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
