#!/usr/bin/env python3
"""Export a YOLACT network as a static inference model for Paddle Inference, or as ONNX.

Only the network is exported (input [1, 3, S, S] preprocessed, S the config's
max_size; outputs loc, conf, mask, priors, proto); Detect and postprocess stay
in Python. YOLACT++ also gets its mask-IoU net as <PREFIX>_maskiou. Run the
result with ``eval.py --inference_model PREFIX`` or ``utils.deploy.runners.StaticYolact``.

    python tools/export_model.py --trained_model weights/yolact_base_54_800000.pth --output exported/yolact_base
    python tools/export_model.py --trained_model weights/yolact_base_54_800000.pth --output exported/yolact_base \
        --format onnx      # PREFIX.onnx for onnxruntime (utils.deploy.runners.OnnxYolact); needs paddle2onnx
"""
import argparse
import logging
import os
import sys

# Run from any directory: the project's top-level packages live one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.runtime import quiet_paddle_import  # noqa: E402

quiet_paddle_import()

from utils.errors import OutputError, run_cli  # noqa: E402
from utils.deploy.network_export import export_yolact  # noqa: E402
from utils.deploy.onnx_export import export_onnx  # noqa: E402
from utils.weights.loader import load_model  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--trained_model', required=True,
                   help='weights: a reference .pth (converted on the fly) or a .pdparams')
    p.add_argument('--config', default=None,
                   help="config name (default: the checkpoint's record, else the file name: "
                        'yolact_base_54_800000.pth -> yolact_base)')
    p.add_argument('--output', required=True, metavar='PREFIX',
                   help='output path without extension: writes PREFIX.json, PREFIX.pdiparams, '
                        'PREFIX.yolact.json (and PREFIX_maskiou.* for YOLACT++)')
    p.add_argument('--format', default='paddle', choices=('paddle', 'onnx'),
                   help='paddle: PREFIX.json + PREFIX.pdiparams for Paddle Inference (default); onnx: '
                        'PREFIX.onnx for onnxruntime, converted by paddle2onnx (pip install paddle2onnx)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg, net = load_model(args.trained_model, args.config)
    try:
        export = export_onnx if args.format == 'onnx' else export_yolact
        export(net, cfg, args.output)
    except OSError as err:
        raise OutputError(f'cannot write the export {args.output}: {err.strerror or err}') from err
    return 0


if __name__ == '__main__':
    logging.basicConfig(level=logging.INFO, format='%(message)s', force=True)
    sys.exit(run_cli(main))
