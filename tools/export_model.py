#!/usr/bin/env python3
"""Export a YOLACT network as a static inference model for Paddle Inference, or as ONNX.

Only the network is exported (input [1, 3, S, S] preprocessed, S the config's
max_size; outputs loc, conf, mask, priors, proto); Detect and postprocess stay
in Python. YOLACT++ also gets its mask-IoU net as <PREFIX>_maskiou. Run the
result with ``eval.py --inference_model PREFIX`` or ``utils.inference.StaticYolact``.

    python tools/export_model.py --trained_model weights/yolact_base_54_800000.pth --output exported/yolact_base
    python tools/export_model.py --trained_model weights/yolact_base_54_800000.pth --output exported/yolact_base \
        --format onnx      # PREFIX.onnx for onnxruntime (utils.inference.OnnxYolact); needs paddle2onnx
"""
import argparse
import logging
import os
import sys
import warnings

# Run from any directory: the project's top-level packages live one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Paddle's custom-op machinery warns about a missing compiler cache on import; no op is compiled here.
warnings.filterwarnings('ignore', message='No ccache found')

from data.config import config_name_from_weights, get_config  # noqa: E402
from eval import load_trained_model  # noqa: E402
from utils.errors import YolactError  # noqa: E402
from utils.inference import export_onnx, export_yolact  # noqa: E402
from yolact import Yolact  # noqa: E402

logger = logging.getLogger('export_model')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--trained_model', required=True,
                   help='weights: a reference .pth (converted on the fly) or a .pdparams')
    p.add_argument('--config', default=None,
                   help='config name (default: from the weights file name, yolact_base_54_800000.pth -> yolact_base)')
    p.add_argument('--output', required=True, metavar='PREFIX',
                   help='output path without extension: writes PREFIX.json, PREFIX.pdiparams, '
                        'PREFIX.yolact.json (and PREFIX_maskiou.* for YOLACT++)')
    p.add_argument('--format', default='paddle', choices=('paddle', 'onnx'),
                   help='paddle: PREFIX.json + PREFIX.pdiparams for Paddle Inference (default); onnx: '
                        'PREFIX.onnx for onnxruntime, converted by paddle2onnx (pip install paddle2onnx)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s', force=True)
    try:
        cfg = get_config(args.config or config_name_from_weights(args.trained_model))
        net = Yolact.from_config(cfg)
        load_trained_model(net, args.trained_model, cfg)
    except (OSError, ValueError) as e:
        logger.error('error: %s', e)
        return 1
    export = export_onnx if args.format == 'onnx' else export_yolact
    try:
        export(net, cfg, args.output)
    except YolactError as e:   # e.g. an operator paddle2onnx cannot convert
        logger.error('error: %s', e)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
