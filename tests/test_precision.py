"""Precision of Paddle Inference predictors: fp32 (default), bf16 on CPUs with AVX512-BF16 or AMX, fp16 on GPUs."""
import os

import cv2
import numpy as np
import paddle
import pytest

import eval as eval_script
from data.config import get_config
from tools import benchmark as benchmark_tool
from tools.make_shapes_dataset import make_shapes_dataset
from utils.deploy import runners
from utils.deploy.network_export import export_yolact
from utils.errors import ConfigError, run_cli
from utils.predictor import Predictor
from yolact import Yolact

needs_bf16_cpu = pytest.mark.skipif(not runners.cpu_bf16_flags(),
                                    reason='this CPU has neither AVX512-BF16 nor AMX (/proc/cpuinfo)')


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """(prefix, weights path): yolact_shapes with trained-like random weights (tools/benchmark.py), exported."""
    cfg = get_config('yolact_shapes')
    net = Yolact.from_config(cfg)
    benchmark_tool.benchmark_weights(net, 0)
    net.eval()
    folder = tmp_path_factory.mktemp('precision')
    weights = str(folder / 'yolact_shapes_1_10.pdparams')
    paddle.save(net.state_dict(), weights)
    prefix = str(folder / 'export' / 'shapes')
    export_yolact(net, cfg, prefix)
    return prefix, weights


def _box_iou(a, b):
    """IoU of one x1, y1, x2, y2 box with each row of b [N, 4]."""
    lo, hi = np.maximum(a[:2], b[:, :2]), np.minimum(a[2:], b[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = lambda r: (r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])   # noqa: E731
    return inter / (area(a) + area(b) - inter)


@needs_bf16_cpu
def test_bf16_detections_are_close_to_fp32(tmp_path, exported):
    """oneDNN's bfloat16 kernels (8-bit mantissa) against fp32 on the same export and images.

    The network's outputs move by up to ~1.5 % of each output's largest
    magnitude (AMD EPYC with avx512_bf16, 2026-12-07); they must move (bf16 ran)
    and stay within 3 %. These random weights give 100 detections per image
    whose scores lie within 0.04 of each other, so bf16's score steps (~0.004
    near 0.5) reorder near-ties and Fast NMS keeps other near-duplicates: 84 to
    91 of the fp32 detections per image are found by bf16 (same class, box IoU
    > 0.9, score within 0.01), their masks 99.9 % of pixels equal (same CPU).
    """
    prefix, _ = exported
    fp32 = runners.StaticYolact(prefix)
    bf16 = runners.StaticYolact(prefix, precision='bf16')
    x = np.random.RandomState(0).standard_normal([1, 3, 192, 192]).astype(np.float32)
    want, got = fp32(x), bf16(x)
    for key in ('loc', 'conf', 'mask', 'proto'):
        expected, value = want[key].numpy(), got[key].numpy()
        assert value.dtype == np.float32
        worst, scale = np.abs(value - expected).max(), np.abs(expected).max()
        assert 1e-4 * scale < worst <= 0.03 * scale, (key, worst, scale)

    shapes = make_shapes_dataset(str(tmp_path / 'shapes'), num_train=0, num_val=2, size=128, seed=0)
    runs = {p: Predictor.from_exported(prefix, precision=p) for p in ('fp32', 'bf16')}
    for name in sorted(os.listdir(shapes.valid_images)):
        image = cv2.imread(os.path.join(shapes.valid_images, name))
        a, b = (runs[p](image) for p in ('fp32', 'bf16'))
        found, mask_agreement = 0, []
        for i in range(len(a['scores'])):
            same = ((b['classes'] == a['classes'][i]) & (_box_iou(a['boxes'][i], b['boxes']) > 0.9)
                    & (np.abs(b['scores'] - a['scores'][i]) <= 0.01))
            if same.any():
                found += 1
                mask_agreement.append((b['masks'][np.flatnonzero(same)[0]] == a['masks'][i]).mean())
        assert found >= 0.75 * len(a['scores']) and len(a['scores']) > 0, (name, found, len(a['scores']))
        assert min(mask_agreement) >= 0.99, (name, min(mask_agreement))

    # Predictor(weights) on a CPU runs its cached export in the precision asked for.
    net = Predictor(exported[1], device='cpu', precision='bf16').net
    assert isinstance(net, runners.StaticYolact) and net.precision == 'bf16'


def test_precisions_a_device_cannot_run_are_one_line_errors(tmp_path, monkeypatch, capsys, exported):
    prefix, weights = exported
    # fp16 is TensorRT's, on a GPU: refused on a CPU, by the runner, the Predictor and eval.py.
    with pytest.raises(ConfigError, match='precision fp16 runs on a GPU') as err:
        runners.create_predictor(prefix, device='cpu', precision='fp16')
    assert '\n' not in str(err.value)
    with pytest.raises(ConfigError, match='precision fp16 runs on a GPU'):
        Predictor(weights, device='cpu', precision='fp16')
    image = str(tmp_path / 'in.png')
    cv2.imwrite(image, np.zeros((40, 50, 3), np.uint8))
    assert run_cli(eval_script.main, ['--inference_model', prefix, '--device', 'cpu', '--precision', 'fp16',
                                      '--image', f'{image}:{tmp_path}/out.png']) == 1
    assert not os.path.exists(tmp_path / 'out.png')
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'precision fp16 runs on a GPU' in errors[0], errors
    # The dygraph network has no precision option.
    with pytest.raises(ConfigError, match='dygraph network'):
        Predictor(weights, device='cpu', dygraph=True, precision='bf16')

    # A CPU without AVX512-BF16 or AMX: bf16 refused, naming what is missing.
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text('processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw fma\n')
    monkeypatch.setattr(runners, 'CPUINFO', str(cpuinfo))
    with pytest.raises(ConfigError, match='precision bf16 needs a CPU with AVX512-BF16 or AMX') as err:
        runners.StaticYolact(prefix, precision='bf16')
    assert '\n' not in str(err.value)
    cpuinfo.write_text('processor\t: 0\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n')
    assert runners.cpu_bf16_flags() == ('amx_bf16',)


def test_fp16_on_a_gpu_asks_tensorrt_for_half_precision(tmp_path, monkeypatch):
    """The GPU config's options only: no GPU or TensorRT here, so the calls are recorded, not run."""
    from paddle import inference

    calls = []

    class RecordingConfig:
        def __init__(self, *files):
            calls.append(('Config',) + files)

        def __getattr__(self, name):
            return lambda *args, **kwargs: calls.append((name, args, kwargs))

    monkeypatch.setattr(inference, 'Config', RecordingConfig)
    monkeypatch.setattr(inference, 'create_predictor', lambda config: config)
    prefix = str(tmp_path / 'm')
    for ext in ('.json', '.pdiparams'):
        open(prefix + ext, 'w').close()
    runners.create_predictor(prefix, device='gpu', precision='fp16')
    tensorrt = [c for c in calls if c[0] == 'enable_tensorrt_engine']
    assert len(tensorrt) == 1 and tensorrt[0][2]['precision_mode'] == inference.PrecisionType.Half
    assert not [c for c in calls if 'bfloat16' in c[0] or c[0] == 'disable_gpu']
    calls.clear()
    runners.create_predictor(prefix, device='gpu')
    assert not [c for c in calls if c[0] == 'enable_tensorrt_engine']
