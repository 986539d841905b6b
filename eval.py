"""Evaluate YOLACT / YOLACT++: COCO mAP, results files for the COCO server, detections drawn on
images and videos. The flags are the reference eval.py's.

COCO val2017 mAP (the config is read from the weights' file name; .pth files are converted on the fly):
    python eval.py --trained_model weights/yolact_base_54_800000.pth

test-dev results for the evaluation server (results/bbox_detections.json, results/mask_detections.json):
    python eval.py --trained_model weights/yolact_base_54_800000.pth \\
        --dataset coco2017_testdev_dataset --output_coco_json

Your own COCO-format data (no code edits; classes from the annotation file):
    python eval.py --trained_model weights/yolact_resnet50_12_3000.pdparams \\
        --valid_images data/mine/val --valid_info data/mine/annotations/val.json

Images, a folder, a video (a camera: --video 0), drawn:
    python eval.py --trained_model weights/yolact_base_54_800000.pth --score_threshold 0.15 --top_k 15 \\
        --image my_image.png:out.png
    python eval.py ... --images in_folder:out_folder
    python eval.py ... --video in.mp4:out.mp4

... or saved as data: COCO results with the folder's image-info file in --results_dir, one labelme
JSON per image (polygons, to correct in labelme and train on), only some classes (OUT optional):
    python eval.py ... --images in_folder --output_coco_json --output_labelme labelme_folder \\
        --class_filter person,dog --score_threshold 0.3

On a CPU the network runs through Paddle Inference (oneDNN) by default: the weights are exported on
first use into a cache keyed by their content ($YOLACT_CACHE, default ~/.cache/yolact/exported);
--dygraph opts out. A network export (tools/export_model.py --network_only --output_dir DIR) runs with
--inference_model DIR.

Dataset evaluation streams: DataLoader workers decode and preprocess images
while the network runs, and each image's detections are RLE-encoded and
appended to the results files right after post-processing, so memory does
not grow with the dataset. Unreadable images are skipped, named in the log
and counted in the summary. mAP is pycocotools' COCOeval on the files
written; the tables (overall and per class) are printed and saved under --log_dir
with a PNG of per-class AP and precision-recall curves.
"""
import argparse
import dataclasses
import logging

from utils.runtime import quiet_paddle_import

quiet_paddle_import()  # before the first import of paddle, here and in the DataLoader workers

from data.coco import COCOEvalImages, custom_dataset_config  # noqa: E402
from data.config import DATASETS  # noqa: E402
from data.coco_root import coco_root_dataset  # noqa: E402
from data.transforms import BaseTransform  # noqa: E402
from utils.cli import (add_coco_root_flag, add_data_loading_flags, add_max_image_pixels_flag, str2bool,  # noqa: E402
                       count_or_all, fraction, non_negative_int, positive_int)
from utils.errors import ConfigError, run_cli  # noqa: E402
from utils.evaluation.loop import benchmark, evaluate  # noqa: E402
from utils.visual.media import ImageDetector, eval_image, eval_images, eval_video, split_io_spec  # noqa: E402
from utils.predictor import Predictor  # noqa: E402
from utils.evaluation.results import InferenceResults, class_indices  # noqa: E402
from utils.files import check_writable_folder  # noqa: E402
from utils.runtime import select_device  # noqa: E402

logger = logging.getLogger('eval')



def parse_args(argv=None):
    p = argparse.ArgumentParser(description='YOLACT evaluation: COCO mAP, COCO results JSON, drawn images and '
                                            'videos', epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_argument_group('model')
    model.add_argument('--trained_model', default=None,
                       help='weights: a reference .pth (converted on the fly) or a .pdparams, named '
                            '<config>_<epoch>_<iteration> so that the config can be read from the name')
    model.add_argument('--config', default=None,
                       help='config name (e.g. yolact_base); overrides the one read from the weights or '
                            'the exported model')
    model.add_argument('--inference_model', default=None, metavar='DIR',
                       help='run a network export (tools/export_model.py --network_only) through Paddle Inference '
                            'instead of dygraph: oneDNN on CPU, CUDA on GPU; replaces --trained_model')
    model.add_argument('--dygraph', action='store_true',
                       help='on a CPU, run the network in dygraph instead of through Paddle Inference (by default '
                            'the weights are exported on first use into a cache, $YOLACT_CACHE or '
                            '~/.cache/yolact/exported, and reused; faster, see docs/inference.md)')
    model.add_argument('--tensorrt', action='store_true',
                       help='with --inference_model on GPU: run supported subgraphs with TensorRT')
    model.add_argument('--precision', default='fp32', choices=('fp32', 'bf16', 'fp16'),
                       help='of Paddle Inference: bf16 on a CPU with AVX512-BF16 or AMX (oneDNN), fp16 on a GPU '
                            'with --inference_model (TensorRT); the dygraph network runs fp32')
    model.add_argument('--device', default=None, choices=('cpu', 'gpu'),
                       help='where the network runs (default: gpu when Paddle has CUDA and a GPU is visible)')

    data = p.add_argument_group('dataset evaluation (the default mode)')
    data.add_argument('--dataset', default=None, choices=sorted(DATASETS),
                      help="dataset to evaluate instead of the config's, e.g. coco2017_dataset, "
                           'coco2017_testdev_dataset (no ground truth: only writes the results files)')
    add_coco_root_flag(data)
    data.add_argument('--valid_images', default=None, help='custom COCO-format dataset: image folder')
    data.add_argument('--valid_info', default=None,
                      help='custom COCO-format dataset: annotation file (an image-info file without '
                           'annotations, like test-dev, only writes the results files)')
    data.add_argument('--class_names', default=None,
                      help='custom dataset: comma-separated class names in the order the model was trained '
                           'with, matched to the category names of --valid_info (default: every category '
                           'in increasing id order, as train.py does)')
    data.add_argument('--max_images', default=-1, type=count_or_all,
                      help='evaluate at most this many images (-1: all), chosen by the reference\'s '
                           'deterministic image-id hash, so the subset matches the reference\'s')
    data.add_argument('--output_coco_json', action='store_true',
                      help='dataset: only write bbox_detections.json and mask_detections.json to --results_dir, '
                           'without computing mAP (for the COCO evaluation server); --image/--images/--video: '
                           'write them with image_info.json, the COCO image-info file of the images or frames')
    data.add_argument('--results_dir', default='results',
                      help='folder of bbox_detections.json and mask_detections.json (always written by a '
                           'dataset evaluation, so that mAP can be recomputed from them)')
    data.add_argument('--log_dir', default='logs', help='folder of the saved mAP tables (eval_*.json)')
    data.add_argument('--num_workers', default=2, type=non_negative_int,
                      help='DataLoader processes decoding and preprocessing images (0: in this process)')
    add_data_loading_flags(data)
    add_max_image_pixels_flag(data)
    data.add_argument('--benchmark', action='store_true',
                      help='time the dataset images (data wait, network, detect, postprocess) without '
                           'writing results or computing mAP')

    detection = p.add_argument_group('detection')
    detection.add_argument('--score_threshold', default=0.0, type=fraction,
                           help='drop detections whose score is not above this (mAP, results files and drawing)')
    detection.add_argument('--top_k', default=5, type=positive_int,
                           help='draw at most this many detections per image or frame (drawing only; '
                                'mAP uses every detection, as the reference does; not the NMS candidate '
                                'count, which is the config\'s nms_top_k)')
    detection.add_argument('--fast_nms', default=True, type=str2bool,
                           help='Fast NMS (true, the default) or traditional greedy NMS (false)')
    detection.add_argument('--cross_class_nms', default=False, type=str2bool,
                           help='suppress overlapping boxes across classes (Fast NMS only)')
    detection.add_argument('--class_filter', default=None, metavar='NAMES',
                           help="comma-separated class names to keep (the model's names); the others are "
                                'neither drawn nor written nor scored')

    display = p.add_argument_group('images and videos')
    display.add_argument('--image', default=None, metavar='IN[:OUT]',
                         help='detect in one image; write the drawing to OUT, or show it in a window '
                              '(not with --output_coco_json/--output_labelme)')
    display.add_argument('--images', default=None, metavar='IN_DIR[:OUT_DIR]',
                         help='detect in every image of IN_DIR; drawings go to OUT_DIR/<name>.png (OUT_DIR may '
                              'be left out with --output_coco_json/--output_labelme)')
    display.add_argument('--video', default=None, metavar='IN[:OUT]',
                         help='detect in a video file or a camera (a number: its index); write OUT (mp4), '
                              'or show it in a window (Esc stops; not with --output_coco_json)')
    display.add_argument('--output_labelme', default=None, metavar='DIR',
                         help='--image/--images: write DIR/<image name>.json, the detections as labelme '
                              'polygons (open DIR in labelme to correct them)')
    display.add_argument('--display_masks', default=True, type=str2bool, help='draw the masks')
    display.add_argument('--display_bboxes', default=True, type=str2bool, help='draw the boxes')
    display.add_argument('--display_text', default=True, type=str2bool, help='draw class names')
    display.add_argument('--display_scores', default=True, type=str2bool,
                         help='draw the score after the class name')
    args = p.parse_args(argv)

    if (args.trained_model is None) == (args.inference_model is None):
        p.error('give exactly one of --trained_model and --inference_model')
    if args.tensorrt and args.inference_model is None:
        p.error('--tensorrt needs --inference_model')
    modes = [m for m in ('image', 'images', 'video') if getattr(args, m) is not None]
    if len(modes) > 1 or (modes and args.benchmark) or (args.benchmark and args.output_coco_json):
        p.error('choose one mode: --image, --images, --video, --benchmark or a dataset evaluation')
    if args.output_labelme is not None and not (args.image or args.images):
        p.error('--output_labelme needs image files: use it with --image or --images')
    if args.dataset is not None and (args.valid_images or args.valid_info):
        p.error('give either --dataset or --valid_images/--valid_info')
    if args.coco_root and (args.valid_images or args.valid_info):
        p.error('give either --coco_root or --valid_images/--valid_info')
    if args.class_names and not args.valid_info:
        p.error('--class_names belongs to a custom dataset (--valid_info)')
    return args


def build_predictor(args):
    """The Predictor of the flags: dygraph weights or an exported model, with the dataset's classes.

    The model's config and classes come from its record (see
    utils.weights.loader); a custom or named dataset only decides how the
    model's classes map to the dataset's category ids.
    """
    device = select_device(args.device)
    detect_options = dict(use_fast_nms=args.fast_nms, use_cross_class_nms=args.cross_class_nms,
                          score_threshold=args.score_threshold)
    if args.inference_model is not None:
        predictor = Predictor.from_exported(args.inference_model, device=device, use_tensorrt=args.tensorrt,
                                            config=args.config, precision=args.precision, **detect_options)
    else:
        predictor = Predictor(args.trained_model, config=args.config, device=device, dygraph=args.dygraph,
                              precision=args.precision, **detect_options)
    cfg = predictor.cfg
    if args.dataset is not None or args.coco_root:
        dataset_cfg = DATASETS[args.dataset] if args.dataset is not None else cfg.dataset
        if args.coco_root:
            dataset_cfg = coco_root_dataset(args.coco_root, dataset_cfg, ('valid',))
        if len(dataset_cfg.class_names) + 1 != cfg.num_classes:
            raise ConfigError(f'{args.dataset or dataset_cfg.name} has {len(dataset_cfg.class_names)} classes, '
                              f'the model {cfg.num_classes - 1}')
    elif args.valid_info is not None:
        dataset_cfg = custom_dataset_config(args.valid_info, args.class_names,
                                            model_classes=cfg.dataset.class_names,
                                            valid_images=args.valid_images, valid_info=args.valid_info)
        if len(dataset_cfg.class_names) + 1 != cfg.num_classes:
            raise ConfigError(f'{args.valid_info} gives {len(dataset_cfg.class_names)} classes '
                              f'({", ".join(dataset_cfg.class_names)}), the model has {cfg.num_classes - 1} '
                              f'({", ".join(cfg.dataset.class_names)}); name them with --class_names')
    else:
        return predictor
    predictor.cfg = dataclasses.replace(cfg, dataset=dataset_cfg)
    return predictor


def run_media(args, predictor, class_filter):
    """--image, --images or --video: drawings, and the detections as data when asked."""
    draw = dict(max_drawn=args.top_k, draw_masks=args.display_masks, draw_boxes=args.display_bboxes,
                draw_text=args.display_text, draw_scores=args.display_scores, class_filter=class_filter)
    mode = 'image' if args.image is not None else 'images' if args.images is not None else 'video'
    source, out = split_io_spec(getattr(args, mode), mode)
    as_data = args.output_coco_json or args.output_labelme is not None
    if mode == 'images' and out is None and not as_data:
        raise ConfigError('--images needs IN_DIR:OUT_DIR (or --output_coco_json / --output_labelme)')
    with InferenceResults(predictor.class_names, args.results_dir if args.output_coco_json else None,
                          args.output_labelme, image_root=source if mode == 'images' else None) as results:
        detect = dict(results=results if as_data else None, **draw)
        cap = dict(max_pixels=args.max_image_pixels)
        if mode == 'image':
            eval_image(ImageDetector(predictor, **detect), source, out, show=not as_data, **cap)
        elif mode == 'images':
            eval_images(ImageDetector(predictor, **detect), source, out, **cap)
        else:
            # Per-class colours keep an object's colour stable from frame to frame.
            eval_video(ImageDetector(predictor, class_color=True, **detect), source, out, show=not as_data, **cap)
    return 0


def check_outputs(args):
    """Prove writable the output folders the selected mode writes (creating none): before the model is
    loaded or any image is run, so that an unwritable one costs nothing."""
    media = args.image is not None or args.images is not None or args.video is not None
    if args.benchmark:
        return
    if not media or args.output_coco_json:
        check_writable_folder(args.results_dir, 'results files (--results_dir)')
    if not media and not args.output_coco_json:
        check_writable_folder(args.log_dir, 'evaluation logs (--log_dir)')
    if args.output_labelme is not None:
        check_writable_folder(args.output_labelme, 'labelme files (--output_labelme)')


def main(argv=None):
    """Run the mode the flags select; returns the process exit code."""
    args = parse_args(argv)
    check_outputs(args)
    predictor = build_predictor(args)
    class_filter = (class_indices(args.class_filter, predictor.class_names)
                    if args.class_filter is not None else None)
    if args.image is not None or args.images is not None or args.video is not None:
        return run_media(args, predictor, class_filter)

    cfg = predictor.cfg
    ds = cfg.dataset
    dataset = COCOEvalImages(ds.valid_images, ds.valid_info, BaseTransform.from_config(cfg), has_gt=ds.has_gt,
                             strict=args.strict, max_pixels=args.max_image_pixels)
    if args.benchmark:
        benchmark(predictor, dataset, args.max_images, args.num_workers, shared_memory=args.shared_memory)
        return 0
    compute_map = ds.has_gt and not args.output_coco_json
    if not ds.has_gt and not args.output_coco_json:
        logger.info('%s has no ground truth: writing the results files only', ds.name)
    evaluate(predictor, dataset, args.results_dir, args.max_images, args.num_workers, compute_map=compute_map,
             log_dir=args.log_dir, shared_memory=args.shared_memory, class_filter=class_filter)
    return 0


if __name__ == '__main__':
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s', datefmt='%H:%M:%S', force=True)
    raise SystemExit(run_cli(main))
