"""tools/benchmark.py --train: the per-stage training step of ours and of a reference checkout (not timed)."""
import textwrap

import numpy as np
import pytest

from data.config import get_config
from tools import benchmark
from utils.errors import MissingFileError

SIDE = 128


@pytest.fixture(scope='module')
def small_step():
    cfg = get_config('yolact_resnet50', max_size=SIDE, freeze_bn=True)
    batch = benchmark.synthetic_training_batch(2, SIDE)
    return cfg, batch, benchmark.TrainStep(cfg, batch)


def test_our_step_reports_every_stage_and_the_losses(small_step):
    cfg, _, step = small_step
    medians = benchmark.train_benchmark({'ours': step}, cfg, 2, runs=1, warmup=0, pause=0)
    for kind in ('wall', 'cpu'):
        assert set(medians['ours'][kind]) == set(benchmark.TRAIN_STAGES) | {'total'}
        assert medians['ours'][kind]['total'] > 0
    losses = step()['losses']
    assert set(losses) == {'loss_box', 'loss_conf', 'loss_mask', 'loss_segm'}
    assert all(np.isfinite(v) and v > 0 for v in losses.values())


def test_reference_dir_without_the_reference_code_is_refused(small_step, tmp_path):
    cfg, batch, step = small_step
    with pytest.raises(MissingFileError, match='no yolact.py'):
        benchmark.ReferenceTrainStep(str(tmp_path), cfg, batch, step.net, str(tmp_path))


def test_reference_flags_need_train():
    with pytest.raises(SystemExit):
        benchmark.parse_args(['--reference', 'somewhere'])


FAKE_REFERENCE = {
    # A stand-in checkout with the reference's module layout and call signatures: one
    # convolution named like ours, a loss of its output. Enough to drive the child process.
    'data/__init__.py': '',
    'data/config.py': '''
        class _Cfg:
            pass
        cfg = _Cfg()
        def set_cfg(name):
            assert name == 'yolact_resnet50_config', name
            cfg.num_classes, cfg.positive_iou_threshold, cfg.negative_iou_threshold = 81, 0.5, 0.4
            cfg.ohem_negpos_ratio, cfg.lr, cfg.momentum, cfg.decay = 3, 1e-3, 0.9, 5e-4
    ''',
    'layers/__init__.py': '',
    'layers/modules/__init__.py': '''
        class MultiBoxLoss:
            def __init__(self, num_classes, pos_threshold, neg_threshold, negpos_ratio):
                pass
            def __call__(self, net, preds, targets, masks, num_crowds):
                assert len(targets) == len(masks) == len(num_crowds)
                return {'B': preds['x'].abs().mean(), 'M': masks[0].mean() * 0 + preds['x'].mean() ** 2}
    ''',
    'yolact.py': '''
        import torch
        class Yolact(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.backbone = torch.nn.Module()
                self.backbone.conv1 = torch.nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
                self.backbone.bn1 = torch.nn.BatchNorm2d(64)
            def forward(self, x):
                return {'x': self.backbone.bn1(self.backbone.conv1(x))}
    ''',
}


def test_reference_child_runs_the_step_on_our_weights(small_step, tmp_path):
    pytest.importorskip('torch')
    cfg, batch, step = small_step
    for path, text in FAKE_REFERENCE.items():
        (tmp_path / 'ref' / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / 'ref' / path).write_text(textwrap.dedent(text))
    # The child loads the weights non-strictly but refuses keys it does not know:
    # only the two layers the stand-in has are sent.
    class Net:
        @staticmethod
        def state_dict():
            return {k: v for k, v in step.net.state_dict().items() if k.startswith(('backbone.conv1.', 'backbone.bn1.'))}
    with benchmark.ReferenceTrainStep(str(tmp_path / 'ref'), cfg, batch, Net, str(tmp_path)) as reference:
        result = reference()
    assert set(result['wall']) == set(result['cpu']) == set(benchmark.TRAIN_STAGES)
    assert set(result['losses']) == {'B', 'M'} and all(np.isfinite(v) for v in result['losses'].values())
