"""The one image reader: every path that reads an image file (``--image``, ``--images``, datasets,
training, ``Predictor`` given a path) goes through :func:`read_image`, and ``--video`` checks its
frame size against the same cap (:func:`check_pixels`).

An image is refused before it is decoded when its header declares more than
``max_pixels`` pixels: a PNG of a few hundred KB can declare 20000 x 20000
pixels, which decodes to 1.2 GB of uint8, 4.8 GB as float32 and, in training,
up to 77 GB after Expand. The header is read for PNG (IHDR), JPEG (SOF), BMP, GIF and
WebP; another format is decoded (under OpenCV's own limit,
``CV_IO_MAX_IMAGE_PIXELS``) and refused after decoding, before any float copy.

DEFAULT_MAX_PIXELS = 2**24 (16.8 M pixels, 4096 x 4096; a 12 or 16 M pixel
photo passes). What one training sample of P pixels and n objects holds at
its peak (data.transforms.SSDAugmentation): the uint8 image 3P bytes, its
float32 copy 12P, Expand's float32 canvas (up to 4x per side) 16 x 12P =
192P, the masks (uint8) nP and their expanded copies 16nP
(RandomSampleCrop takes views): 207P + 17nP, with COCO's 7.3 objects per
image 331P, 5.6 GB at the cap. Two DataLoader workers (one per core of a
2-core machine) at that peak at once hold 11.1 GB, which leaves 12.9 GB of
a 24 GB machine for the trainer. Evaluation holds 15P (the uint8 image and
its float32 copy, 250 MB at the cap). ``--max_image_pixels`` (eval.py,
train.py) changes it.

OpenCV 4 returns None for a file it cannot decode (or one above its limit);
OpenCV 5 raises ``cv2.error`` for the latter: both become an
UnreadableFileError (an OSError) naming the file, which every caller turns
into a skip with a warning (datasets, ``--images``) or one error line
(``--image``).
"""
import os
import struct

import cv2

from utils.errors import ConfigError, MissingFileError, UnreadableFileError

__all__ = ['DEFAULT_MAX_PIXELS', 'check_pixels', 'header_size', 'read_image']

DEFAULT_MAX_PIXELS = 1 << 24

# JPEG start-of-frame markers (the frame header holds the size); C4, C8 and CC are not frames.
_JPEG_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field.
_JPEG_STANDALONE = set(range(0xD0, 0xD9)) | {0x01}
# How far into a JPEG the frame header is looked for (EXIF thumbnails and ICC profiles come first).
_JPEG_SCAN_LIMIT = 1 << 22


def header_size(path):
    """(width, height) declared by the header of the image file ``path``, or None for another format
    or a header too damaged to read (the decoder then has the last word). Reads no pixel data."""
    try:
        with open(path, 'rb') as f:
            head = f.read(32)
            if head.startswith(b'\x89PNG\r\n\x1a\n') and head[12:16] == b'IHDR':
                return struct.unpack('>II', head[16:24])
            if head.startswith(b'\xff\xd8'):
                f.seek(2)
                return _jpeg_size(f)
            if head.startswith(b'BM') and len(head) >= 26:
                if struct.unpack('<I', head[14:18])[0] == 12:     # OS/2 BITMAPCOREHEADER: 16-bit sides
                    return struct.unpack('<HH', head[18:22])
                width, height = struct.unpack('<ii', head[18:26])
                return abs(width), abs(height)
            if head[:6] in (b'GIF87a', b'GIF89a'):
                return struct.unpack('<HH', head[6:10])
            if head.startswith(b'RIFF') and head[8:12] == b'WEBP':
                return _webp_size(head + f.read(32))
    except (OSError, struct.error):
        return None
    return None


def _jpeg_size(f):
    """(width, height) from the first start-of-frame segment of the JPEG stream ``f`` (after SOI)."""
    while f.tell() < _JPEG_SCAN_LIMIT:
        byte = f.read(1)
        if not byte:
            return None
        if byte != b'\xff':
            continue
        marker = f.read(1)
        while marker == b'\xff':    # fill bytes
            marker = f.read(1)
        if not marker:
            return None
        code = marker[0]
        if code in _JPEG_STANDALONE or code == 0x00:
            continue
        length = struct.unpack('>H', f.read(2))[0]
        if length < 2:      # not a JPEG segment: leave it to the decoder
            return None
        if code in _JPEG_SOF:
            _, height, width = struct.unpack('>BHH', f.read(5))
            return width, height
        f.seek(length - 2, os.SEEK_CUR)
    return None


def _webp_size(head):
    """(width, height) of a WebP file from its first chunk (VP8X canvas, VP8L or VP8 frame)."""
    chunk = head[12:16]
    if chunk == b'VP8X':
        width = int.from_bytes(head[24:27], 'little') + 1
        height = int.from_bytes(head[27:30], 'little') + 1
        return width, height
    if chunk == b'VP8L':
        bits = int.from_bytes(head[21:25], 'little')
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b'VP8 ':
        width, height = struct.unpack('<HH', head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


def check_pixels(width, height, max_pixels, what):
    """Raise UnreadableFileError naming ``what`` when width x height exceeds ``max_pixels`` (None: no cap)."""
    if max_pixels is None:
        return
    if max_pixels <= 0:
        raise ConfigError(f'the image pixel cap must be positive, got {max_pixels}')
    if width * height > max_pixels:
        raise UnreadableFileError(
            f'{what} is {width}x{height} = {width * height / 1e6:.1f} M pixels, above the cap of '
            f'{max_pixels / 1e6:.1f} M (--max_image_pixels)')


def _imread(path, flags):
    """cv2.imread whose failures, returned (OpenCV 4) or raised (OpenCV 5), are an UnreadableFileError."""
    try:
        img = cv2.imread(path, flags)
    except cv2.error as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else 'OpenCV error'
        raise UnreadableFileError(f'cannot decode image file {path}: {reason}') from None
    if img is None:
        # (OpenCV 4 also returns None above its pixel limit.)
        raise UnreadableFileError(f'cannot decode image file (corrupt or not an image): {path}')
    return img


def read_image(path, size=None, max_pixels=DEFAULT_MAX_PIXELS):
    """[H, W, 3] BGR uint8, turned upright by its EXIF orientation (as the reference's cv2.imread).

    size: the (height, width) the info file gives, when the pixels must match
    its annotations. A photo whose EXIF orientation turns it sideways but whose
    stored pixels have that size was annotated as stored: the stored pixels are
    returned. max_pixels: the pixel cap (None: none), checked on the header
    before decoding (see the module docstring). Raises MissingFileError /
    UnreadableFileError (both OSError) naming ``path``; with ``size``,
    UnreadableFileError when neither orientation has it.
    """
    if not os.path.isfile(path):
        raise MissingFileError(f'image file not found: {path}')
    declared = header_size(path)
    if declared is not None:
        check_pixels(declared[0], declared[1], max_pixels, path)
    img = _imread(path, cv2.IMREAD_COLOR)
    check_pixels(img.shape[1], img.shape[0], max_pixels, path)
    if size is not None and img.shape[:2] != tuple(size):
        try:
            stored = _imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        except UnreadableFileError:
            stored = None
        if stored is not None and stored.shape[:2] == tuple(size):
            return stored
        raise UnreadableFileError(f'{path} is {img.shape[1]}x{img.shape[0]} but its info file says '
                                  f'{size[1]}x{size[0]}; its annotations would not fit')
    return img
