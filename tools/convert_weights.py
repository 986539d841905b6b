#!/usr/bin/env python3
"""Convert reference PyTorch YOLACT weights (.pth) into a Paddle .pdparams.

Reads both torch.save formats (the pre-1.6 format of the published 2019
checkpoints and the later zip format) without torch. The conversion is
strict: every key of the file must land in the model or be dropped for a
stated reason, and every model parameter must be filled with the right shape;
otherwise nothing is written and the offending keys are listed. A file saved
from DataParallel (every key prefixed ``module.``) is converted without the
prefix, which the report says. The output's folder is created when missing.
"""
import argparse
import logging
import os
import sys
from collections import OrderedDict

# Run from any directory: the project's top-level packages live one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.runtime import quiet_paddle_import  # noqa: E402

quiet_paddle_import()

from data.config import config_name_from_weights, get_config  # noqa: E402
from utils.weights.convert import convert_backbone, convert_checkpoint, imagenet_backbone, save_params  # noqa: E402
from utils.errors import OutputError, run_cli  # noqa: E402
from utils.weights.loader import require_weights_file  # noqa: E402

EPILOG = """examples:
  %(prog)s weights/yolact_base_54_800000.pth weights/yolact_base_54_800000.pdparams
  %(prog)s my_run_3_1000.pth out.pdparams --config yolact_resnet50
  %(prog)s --backbone weights/resnet101_reducedfc.pth weights/resnet101_reducedfc.pdparams
  %(prog)s --backbone --config yolact_plus_base weights/resnet101_reducedfc.pth weights/resnet101_dcn.pdparams
"""

# How many keys of one drop reason to print before summarising the rest.
SHOWN_PER_REASON = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('src', metavar='SRC.pth',
                   help='a YOLACT checkpoint (e.g. yolact_base_54_800000.pth), or with --backbone an '
                        'ImageNet backbone file (resnet101_reducedfc.pth, resnet50-19c8e357.pth, darknet53.pth)')
    p.add_argument('dst', metavar='DST.pdparams', help='output file; written only if the conversion succeeds')
    p.add_argument('--config', metavar='NAME',
                   help='config the weights belong to (default: from the file name, '
                        'yolact_base_54_800000.pth -> yolact_base). With --backbone: convert for this '
                        "config's backbone, e.g. yolact_plus_base for ResNet-101 with DCN")
    p.add_argument('--backbone', action='store_true',
                   help='SRC is an ImageNet backbone for training (default backbone from its file name); '
                        'DST then holds backbone parameters for Yolact.init_weights(backbone_path)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    require_weights_file(args.src)
    # Before converting: a folder that cannot be written fails now, not after the work.
    folder = os.path.dirname(os.path.abspath(args.dst))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise OutputError(f'cannot write {args.dst}: {err.strerror or err} (nothing written)') from err
    if not os.access(folder, os.W_OK):
        raise OutputError(f'cannot write {args.dst}: {folder} is not writable (nothing written)')
    if args.backbone:
        backbone_cfg = get_config(args.config).backbone if args.config else imagenet_backbone(args.src)
        params, report = convert_backbone(args.src, backbone_cfg)
    else:
        cfg = get_config(args.config or config_name_from_weights(args.src))
        params, report = convert_checkpoint(args.src, cfg)
    print_report(report)
    try:
        save_params(params, args.dst)
    except OSError as err:
        raise OutputError(f'cannot write {args.dst}: {err.strerror or err} (nothing written)') from err
    print(f'{report.summary()}; written to {args.dst}')
    return 0


def print_report(report):
    """The dropped keys (grouped by reason) and the keys left at initialisation."""
    if report.stripped_prefix:
        print(report.prefix_note())
    by_reason = OrderedDict()
    for key, reason in report.dropped:
        by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        print(f'dropped {len(keys)} key(s): {reason}')
        print(_key_list(keys))
    if report.left_at_init:
        print(f'left at initialisation {len(report.left_at_init)} key(s): not in an ImageNet file '
              '(deformable conv extras, zero-initialised as the reference does)')
        print(_key_list(report.left_at_init))


def _key_list(keys):
    shown = ', '.join(keys[:SHOWN_PER_REASON])
    more = len(keys) - SHOWN_PER_REASON
    return f'    {shown}' + (f' ... and {more} more' if more > 0 else '')


if __name__ == '__main__':
    # paddle installs an INFO handler on the root logger when imported; this
    # tool prints its own report, so only warnings and errors are logged.
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s', force=True)
    sys.exit(run_cli(main))
