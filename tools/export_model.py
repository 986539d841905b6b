#!/usr/bin/env python3
"""Export the whole YOLACT detector for deployment: PaddleDetection's layout, for Paddle Inference or ONNX.

The graph takes the raw image (RGB, 0..255) and returns the final detections:
preprocessing, the network, Fast NMS, mask assembly, crop, YOLACT++ rescoring,
upsampling and thresholding all run inside it, so PaddleDetection's
deploy/python/infer.py, its ONNX runner, deploy/python/infer.py of this
project, onnxruntime or a model server run it with no Python of this project.

    python tools/export_model.py --trained_model weights/yolact_base_54_800000.pth --output_dir exported/yolact_base
    python tools/export_model.py --trained_model weights/yolact_base_54_800000.pth --output_dir exported/yolact_base_onnx \\
        --format onnx      # DIR/model.onnx; needs paddle2onnx

DIR gets infer_cfg.yml and model.json + model.pdiparams (Paddle >= 3; model.pdmodel on Paddle 2.6), or
model.onnx. Inputs image [B, 3, H, W] float32, im_shape [B, 2], scale_factor [B, 2]; outputs bbox [N, 6]
(class, score, x1, y1, x2, y2 in original pixels), bbox_num [B] int32, mask [N, H, W] int32 (or uint8),
mask_score [N]. Masks cost N x H x W x 4 bytes (100 detections of a 1920x1080 image: 830 MB);
--mask_dtype uint8 and --max_detections bound that.

--network_only exports the network alone (DIR/model.*: preprocessed input [B, 3, S, S]; outputs loc, conf,
mask, priors, proto; YOLACT++ also DIR/model_maskiou.*) for this project's Python post-processing:
eval.py --inference_model DIR and utils.predictor.Predictor.from_exported(DIR), e.g. on a GPU with TensorRT.
"""
import argparse
import logging
import os
import sys

# Run from any directory: the project's top-level packages live one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.runtime import quiet_paddle_import  # noqa: E402

quiet_paddle_import()

from utils.deploy.detector_export import FORMATS, export_detector  # noqa: E402
from utils.deploy.network_export import NETWORK_PREFIX, export_yolact  # noqa: E402
from utils.deploy.onnx_export import export_onnx  # noqa: E402
from utils.cli import str2bool  # noqa: E402
from utils.errors import OutputError, run_cli  # noqa: E402
from utils.weights.loader import load_model  # noqa: E402



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--trained_model', required=True,
                   help='weights: a reference .pth (converted on the fly) or a .pdparams')
    p.add_argument('--config', default=None,
                   help="config name (default: the checkpoint's record, else the file name: "
                        'yolact_base_54_800000.pth -> yolact_base)')
    p.add_argument('--output_dir', required=True, metavar='DIR',
                   help='the export folder (created; an earlier export there is replaced, other files are not)')
    p.add_argument('--format', default='paddle', choices=FORMATS,
                   help='paddle: model.json/.pdmodel + model.pdiparams for Paddle Inference (default); '
                        'onnx: model.onnx for onnxruntime, converted by paddle2onnx (pip install paddle2onnx)')
    p.add_argument('--batch_size', default=1, type=int, help='images per run, fixed in the graph (default 1)')
    p.add_argument('--mask_dtype', default='int32', choices=('int32', 'uint8'),
                   help="int32: PaddleDetection's mask output; uint8: a quarter of the memory")
    p.add_argument('--max_detections', default=None, type=int,
                   help="at most this many detections per image (default: the config's max_num_detections, 100)")
    p.add_argument('--score_threshold', default=0.0, type=float,
                   help='drop detections scoring at or below this inside the graph (default 0: keep all)')
    p.add_argument('--fast_nms', default=True, type=str2bool,
                   help='Fast NMS (the default); traditional NMS cannot be exported')
    p.add_argument('--cross_class_nms', default=False, type=str2bool, help='Fast NMS across classes')
    p.add_argument('--network_only', action='store_true',
                   help='export the network alone (DIR/model.*) for eval.py --inference_model DIR and '
                        'Predictor.from_exported: decoding, NMS and masks then run in Python')
    p.add_argument('--draw_threshold', default=0.5, type=float,
                   help="infer_cfg.yml's draw_threshold: the score clients draw above (default 0.5)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error('--batch_size must be at least 1')
    if args.max_detections is not None and args.max_detections < 1:
        p.error('--max_detections must be at least 1')
    return args


def main(argv=None):
    args = parse_args(argv)
    cfg, net = load_model(args.trained_model, args.config)
    try:
        if args.network_only:
            export = export_onnx if args.format == 'onnx' else export_yolact
            export(net, cfg, os.path.join(args.output_dir, NETWORK_PREFIX), batch_size=args.batch_size)
            return 0
        export_detector(net, cfg, args.output_dir, args.format, batch_size=args.batch_size,
                        mask_dtype=args.mask_dtype, max_detections=args.max_detections,
                        score_threshold=args.score_threshold, use_fast_nms=args.fast_nms,
                        use_cross_class_nms=args.cross_class_nms, draw_threshold=args.draw_threshold)
    except OSError as err:
        if isinstance(err, OutputError):
            raise
        raise OutputError(f'cannot write the export {args.output_dir}: {err.strerror or err}') from err
    return 0


if __name__ == '__main__':
    logging.basicConfig(level=logging.INFO, format='%(message)s', force=True)
    sys.exit(run_cli(main))
