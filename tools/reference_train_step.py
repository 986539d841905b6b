#!/usr/bin/env python3
"""The reference PyTorch code's training step, timed stage by stage for tools/benchmark.py --train.

Run by benchmark.py in a child process (the reference's top-level packages,
``data``, ``layers``, ``utils``, ``yolact``, share their names with this
project's, so the two cannot live in one interpreter):

    python tools/reference_train_step.py REFERENCE_DIR CONFIG BATCH.npz WEIGHTS.npz [THREADS]

REFERENCE_DIR is a checkout of dbolya/yolact; CONFIG a reference config name
without ``_config`` (e.g. yolact_resnet50). BATCH.npz holds ``images``
[B, 3, S, S] and per image ``targets_i`` [n, 5] and ``masks_i`` [n, S, S]
(no crowds); WEIGHTS.npz the reference state dict (BatchNorm as
running_mean / running_var); THREADS: torch's intra-op threads (default:
torch's own choice). The child prints ``ready``, then answers each
``step`` line on stdin with one JSON line {'wall': {stage: seconds}, 'cpu': {stage:
process CPU seconds}, 'losses': {...}}
and stops at end of input. The step is the reference train.py's: forward,
MultiBoxLoss, backward of the summed terms, SGD with momentum and weight
decay; BatchNorm frozen as the reference freezes it below 6 images per GPU.
"""
import json
import sys
import warnings

from stage_clock import StageClock  # tools/ is sys.path[0] here; stage_clock imports nothing of the project


def main(argv):
    ref_dir, config, batch_path, weights_path = argv[:4]
    sys.path.insert(0, ref_dir)
    # torch.jit's notes on the reference's ScriptModules, once per run: not this benchmark's business.
    warnings.filterwarnings('ignore', category=UserWarning, module='torch.jit')
    import numpy as np
    import torch

    if len(argv) > 4:
        torch.set_num_threads(int(argv[4]))
    # The reference's yolact.py calls torch.cuda.current_device() at import,
    # which raises on a CPU-only torch; nothing else it runs here needs CUDA.
    torch.cuda.current_device = lambda: 0
    try:
        import torchvision  # noqa: F401
    except ImportError:
        _stand_in_torchvision()
    from data.config import cfg, set_cfg
    from layers.modules import MultiBoxLoss
    from yolact import Yolact

    set_cfg(config + '_config')
    cfg.freeze_bn = True
    net = Yolact()
    with np.load(weights_path) as weights:
        state = {k: torch.from_numpy(weights[k]) for k in weights.files}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith('num_batches_tracked')]
    if missing or unexpected:
        raise SystemExit(f'reference weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}')
    net.train()
    criterion = MultiBoxLoss(num_classes=cfg.num_classes, pos_threshold=cfg.positive_iou_threshold,
                             neg_threshold=cfg.negative_iou_threshold, negpos_ratio=cfg.ohem_negpos_ratio)
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.decay)

    with np.load(batch_path) as batch:
        images = torch.from_numpy(batch['images'])
        count = images.shape[0]
        targets = [torch.from_numpy(batch[f'targets_{i}']) for i in range(count)]
        masks = [torch.from_numpy(batch[f'masks_{i}']) for i in range(count)]
    print('ready', flush=True)

    for line in sys.stdin:
        if line.strip() != 'step':
            continue
        clock = StageClock()
        with clock('forward'):
            preds = net(images)
        with clock('loss'):
            # The reference loss strips crowd masks from its list argument in place: fresh lists each step.
            losses = criterion(net, preds, list(targets), list(masks), [0] * count)
            loss = sum(losses.values())
        with clock('backward'):
            loss.backward()
        with clock('optimizer'):
            optimizer.step()
            optimizer.zero_grad()
        times = dict(clock.times, losses={k: v.item() for k, v in losses.items()})
        print(json.dumps(times), flush=True)
    return 0


def _stand_in_torchvision():
    """Empty torchvision modules for a torch without torchvision.

    The reference imports torchvision's ResNet Bottleneck (used only by
    configs with use_prediction_module, which no published one sets) and its
    transforms (unused by training); the step timed here calls neither.
    """
    import types

    class Bottleneck:
        def __init__(self, *args, **kwargs):
            raise RuntimeError('torchvision is not installed (needed by use_prediction_module)')

    names = ('torchvision', 'torchvision.models', 'torchvision.models.resnet', 'torchvision.transforms')
    modules = {name: types.ModuleType(name) for name in names}
    modules['torchvision'].models = modules['torchvision.models']
    modules['torchvision'].transforms = modules['torchvision.transforms']
    modules['torchvision.models'].resnet = modules['torchvision.models.resnet']
    modules['torchvision.models.resnet'].Bottleneck = Bottleneck
    sys.modules.update(modules)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
