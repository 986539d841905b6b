"""The inference benchmark tool (tools/benchmark.py): every stage timed for the exported and the dygraph chain."""
import paddle

from data.config import get_config
from layers.functions import Detect
from tools import benchmark as benchmark_tool
from utils.deploy.network_export import export_yolact
from utils.predictor import Predictor
from yolact import Yolact


def test_benchmark_tool_times_every_stage(tmp_path):
    cfg = get_config('yolact_shapes')
    net = Yolact.from_config(cfg)
    benchmark_tool.benchmark_weights(net, seed=0)
    net.eval()
    prefix = str(tmp_path / 'shapes')
    export_yolact(net, cfg, prefix)
    image = benchmark_tool.synthetic_image(str(tmp_path / 'image.jpg'), width=160, height=120)
    chains = {'exported': Predictor.from_exported(prefix), 'dygraph': Predictor.from_network(cfg, net)}
    medians = benchmark_tool.benchmark(chains, cfg, image, runs=2, warmup=1)
    for label in ('exported', 'dygraph'):
        assert set(medians[label]) == set(benchmark_tool.STAGES) | {'total'}
        assert all(v > 0 for v in medians[label].values())
        assert medians[label]['total'] >= medians[label]['network']
    # Trained-like random weights: Detect keeps the full number of detections.
    with paddle.no_grad():
        det = Detect.from_config(cfg)(net(paddle.rand([1, 3, cfg.max_size, cfg.max_size])))[0]
    assert det['scores'].shape[0] == cfg.max_num_detections
