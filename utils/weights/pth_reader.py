"""Read PyTorch ``torch.save`` state dicts into numpy, without torch.

Two on-disk formats exist and both are read:

* legacy (torch < 1.6, the format of the 2019 published YOLACT weights): five
  pickles back to back -- magic number, protocol version, system info, the
  object (tensors refer to storages through persistent ids
  ``('storage', storage_type, key, location, numel, view_metadata)``), the
  sorted list of storage keys -- followed by each storage's raw bytes, in that
  key order, each preceded by its element count as a little-endian int64;
* zip (torch >= 1.6): ``<archive>/data.pkl`` holds the object with persistent
  ids ``('storage', storage_type, key, location, numel)``, and
  ``<archive>/data/<key>`` the raw bytes of each storage.

Unpickling is restricted (utils.weights.safe_pickle) to an allow-list of globals
(tensor rebuild functions, ``OrderedDict``, storage types), so a ``.pth`` can
never run code here; any other object in the file is reported as unsupported. Storages are read with
one ``readinto`` each into numpy buffers (no per-element Python), and tensors
are rebuilt from (storage, offset, size, stride), so views saved with
torch.save (transposed, sliced, sharing a storage) come back correctly.
"""
import collections
import io
import logging
import os
import struct
import zipfile
from dataclasses import dataclass
from typing import Tuple

import numpy as np

from utils.weights.safe_pickle import PickleFileError, RestrictedUnpickler, StandIn, unpickle

logger = logging.getLogger(__name__)

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001
_ZIP_LOCAL_HEADER = struct.Struct('<4s5H3L2H')

# torch storage class name -> element dtype as stored. bfloat16 has no numpy
# dtype: its raw 16 bits are read and widened to float32 (exactly) afterwards.
_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': np.uint16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_, 'ComplexFloatStorage': np.complex64,
    'ComplexDoubleStorage': np.complex128, 'UntypedStorage': np.uint8,
}

# Keys under which training scripts commonly nest the model's state dict.
# A wrapper is unwrapped only through one of these names, never by guessing.
_WRAPPER_KEYS = ('state_dict', 'model_state_dict', 'model')


class PthError(PickleFileError):
    """A file that cannot be read as a torch.save state dict; says which file and why."""


@dataclass(frozen=True)
class _StorageType:
    """What an allowed ``torch.<X>Storage`` global unpickles to."""
    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """A storage as the pickle refers to it; ``start`` (elements) is non-zero
    only for the storage views of the legacy format."""
    key: str
    start: int


@dataclass(frozen=True)
class _LazyTensor:
    """A tensor whose storage bytes have not been read yet (legacy files keep
    them after the pickle). size/stride/offset are in elements."""
    storage: _StorageRef
    offset: int
    size: Tuple[int, ...]
    stride: Tuple[int, ...]


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    """Stand-in for torch._utils._rebuild_tensor(_v2); the extra v2 arguments
    (requires_grad, backward hooks, metadata) do not affect the values."""
    return _LazyTensor(storage, int(storage_offset), tuple(int(s) for s in size),
                       tuple(int(s) for s in stride))


def _rebuild_parameter(data, _requires_grad, _backward_hooks):
    """Stand-in for torch._utils._rebuild_parameter: a Parameter is its data."""
    return data


_ALLOWED_GLOBALS = {
    ('collections', 'OrderedDict'): StandIn(collections.OrderedDict),
    ('torch._utils', '_rebuild_tensor'): StandIn(_rebuild_tensor),
    ('torch._utils', '_rebuild_tensor_v2'): StandIn(_rebuild_tensor),
    ('torch._utils', '_rebuild_parameter'): StandIn(_rebuild_parameter),
}


class _Unpickler(RestrictedUnpickler):
    """Unpickler that resolves only the allow-listed globals and records the
    storages the persistent ids declare: ``storages[key] = (_StorageType, numel)``."""
    allowed = _ALLOWED_GLOBALS
    error = PthError
    refusal = 'only state dicts (dicts of tensors) can be read without torch'

    def __init__(self, file, path, legacy):
        super().__init__(file, path)
        self.legacy = legacy
        self.storages = {}

    def find_class(self, module, name):
        if module in ('torch', 'torch.storage') and name in _STORAGE_DTYPES:
            return _StorageType(name, np.dtype(_STORAGE_DTYPES[name]))
        return super().find_class(module, name)

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] not in ('storage', b'storage'):
            kind = pid[0] if isinstance(pid, tuple) and pid else pid
            raise PthError(self.path, f'unsupported persistent object {kind!r} (only tensor storages '
                                      'are supported; was a whole nn.Module saved?)')
        if len(pid) != (6 if self.legacy else 5) or not isinstance(pid[1], _StorageType):
            raise PthError(self.path, f'corrupt storage reference {pid!r}')
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        declared = self.storages.setdefault(key, (storage_type, numel))
        if declared != (storage_type, numel):
            raise PthError(self.path, f'storage {key!r} is declared twice with different types or sizes')
        view = pid[5] if self.legacy else None
        if view is None:
            return _StorageRef(key, 0)
        # Pre-1.0 storage views: (view key, element offset into the root, view numel).
        _, start, view_numel = view
        if start < 0 or start + view_numel > numel:
            raise PthError(self.path, f'corrupt storage view {view!r} of storage {key!r} ({numel} elements)')
        return _StorageRef(key, int(start))


def load_pth(path):
    """The state dict in a ``torch.save`` file, as numpy arrays.

    Args:
        path: a legacy (pre-1.6) or zip-format ``.pth`` holding a state dict
            ``{name: tensor}`` -- or a dict wrapping exactly one under
            ``'state_dict'``, ``'model_state_dict'`` or ``'model'``.
    Returns:
        OrderedDict {name: np.ndarray} in the file's order; each array is
        C-contiguous, owns or exclusively views its memory, and keeps the
        tensor's dtype and shape (bfloat16 is widened to float32 exactly).
    Raises:
        PthError naming the file and the problem (not a torch.save file,
        truncated or corrupt data, an unsupported pickled object, no state dict).
    """
    with open(path, 'rb') as f:
        head = f.read(512)
        if not head:
            raise PthError(path, 'empty file')
        f.seek(0)
        if head.startswith(b'PK\x03\x04'):
            obj, storages, fmt = _read_zip(f, path)
        elif len(head) >= 262 and head[257:262] == b'ustar':
            raise PthError(path, 'tar-format torch.save file (torch < 0.1.10) is not supported')
        elif head[:1] == b'\x80':
            obj, storages, fmt = _read_legacy(f, path)
        else:
            raise PthError(path, 'not a torch.save file (neither a zip archive nor a pickle)')
    state_dict = _state_dict_of(obj, path)
    uses = collections.Counter(t.storage.key for t in state_dict.values())
    out = collections.OrderedDict(
        (name, _materialize(t, storages, uses, name, path)) for name, t in state_dict.items())
    logger.info('read %d tensors (%.1f MB) from %s (%s format)', len(out),
                sum(a.nbytes for a in out.values()) / 2 ** 20, path, fmt)
    return out


def _read_legacy(f, path):
    """(object, {key: 1-D storage array}, 'legacy') from a pre-1.6 file."""
    try:
        magic = unpickle(_Unpickler(f, path, legacy=True), 'header')
    except PthError:
        magic = None  # e.g. a pickle of numpy arrays, whose globals are not allowed
    if not isinstance(magic, int) or isinstance(magic, bool) or magic != _LEGACY_MAGIC:
        raise PthError(path, 'not a torch.save file (a pickle without the torch magic number; '
                             'a Paddle .pdparams or a plain pickle?)')
    protocol = unpickle(_Unpickler(f, path, legacy=True), 'header')
    if protocol != _LEGACY_PROTOCOL:
        raise PthError(path, f'unsupported legacy protocol version {protocol!r}')
    sys_info = unpickle(_Unpickler(f, path, legacy=True), 'header')
    little = not isinstance(sys_info, dict) or sys_info.get('little_endian', True)
    unpickler = _Unpickler(f, path, legacy=True)
    obj = unpickle(unpickler, 'object pickle')
    keys = unpickle(_Unpickler(f, path, legacy=True), 'storage key list')
    if not isinstance(keys, list) or set(map(str, keys)) != set(unpickler.storages):
        raise PthError(path, 'corrupt: the storage key list does not match the storages the tensors use')

    file_size = os.fstat(f.fileno()).st_size
    count_format = '<q' if little else '>q'
    storages = {}
    for key in map(str, keys):
        storage_type, numel = unpickler.storages[key]
        pos = f.tell()
        header = f.read(8)
        if len(header) < 8:
            raise PthError(path, f'truncated: storage {key!r} header at offset {pos} is missing, '
                                 f'file has {file_size} bytes')
        count, = struct.unpack(count_format, header)
        if count != numel:
            raise PthError(path, f'corrupt: storage {key!r} holds {count} elements, the pickle declares {numel}')
        storages[key] = _read_storage(f, pos + 8, storage_type, numel, little, key, file_size, path)
    return obj, storages, 'legacy'


def _read_zip(f, path):
    """(object, {key: 1-D storage array}, 'zip') from a torch >= 1.6 file."""
    try:
        archive = zipfile.ZipFile(f)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PthError(path, f'truncated or corrupt zip archive: {exc}') from None
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith('data.pkl') and n.count('/') <= 1]
        if any(n.endswith('constants.pkl') for n in names):
            raise PthError(path, 'a TorchScript archive (torch.jit.save), not a torch.save state dict')
        if len(pickles) != 1:
            raise PthError(path, f'not a torch.save zip archive (found {len(pickles)} data.pkl records)')
        prefix = pickles[0][:-len('data.pkl')]
        byteorder = b'little'
        if prefix + 'byteorder' in names:
            byteorder = archive.read(prefix + 'byteorder').strip()
        if byteorder not in (b'little', b'big'):
            raise PthError(path, f'unknown byte order record {byteorder!r}')
        unpickler = _Unpickler(io.BytesIO(archive.read(pickles[0])), path, legacy=False)
        obj = unpickle(unpickler, 'object pickle')

        file_size = os.fstat(f.fileno()).st_size
        storages = {}
        for key, (storage_type, numel) in unpickler.storages.items():
            name, dtype = f'{prefix}data/{key}', storage_type.dtype
            try:
                info = archive.getinfo(name)
            except KeyError:
                raise PthError(path, f'corrupt: record {name!r} of storage {key!r} is missing') from None
            if info.file_size != numel * dtype.itemsize:
                raise PthError(path, f'corrupt: storage {key!r} has {info.file_size} bytes, '
                                     f'the pickle declares {numel} x {dtype.itemsize}')
            little = byteorder == b'little'
            if info.compress_type == zipfile.ZIP_STORED:
                start = _zip_data_offset(f, info, path)
                storages[key] = _read_storage(f, start, storage_type, numel, little, key, file_size, path)
            else:
                # torch writes storages uncompressed; a re-zipped file still reads, just slower.
                raw = np.frombuffer(archive.read(name), dtype.newbyteorder('<' if little else '>'), numel)
                storages[key] = _native(raw, storage_type)
    return obj, storages, 'zip'


def _zip_data_offset(f, info, path):
    """Where an uncompressed zip member's bytes start (after its local header)."""
    f.seek(info.header_offset)
    header = f.read(_ZIP_LOCAL_HEADER.size)
    if len(header) < _ZIP_LOCAL_HEADER.size or not header.startswith(b'PK\x03\x04'):
        raise PthError(path, f'corrupt zip archive: bad local header for {info.filename!r}')
    fields = _ZIP_LOCAL_HEADER.unpack(header)
    name_len, extra_len = fields[-2], fields[-1]
    return info.header_offset + _ZIP_LOCAL_HEADER.size + name_len + extra_len


def _read_storage(f, start, storage_type, numel, little, key, file_size, path):
    """numel elements of a storage at byte offset start, as a native-order 1-D array."""
    dtype = storage_type.dtype
    nbytes = numel * dtype.itemsize
    if start + nbytes > file_size:
        raise PthError(path, f'truncated: storage {key!r} needs {nbytes} bytes at offset {start}, '
                             f'file has {max(file_size - start, 0)}')
    stored = dtype.newbyteorder('<' if little else '>')
    out = np.empty(numel, stored)
    f.seek(start)
    if f.readinto(out.view(np.uint8)) != nbytes:
        raise PthError(path, f'truncated: storage {key!r} could not be read in full')
    return _native(out, storage_type)


def _native(array, storage_type):
    """A storage array in native byte order; bfloat16 widened to float32."""
    array = array.astype(storage_type.dtype.newbyteorder('='), copy=False)
    if storage_type.name == 'BFloat16Storage':
        # bfloat16 is the top half of a float32: shifting the bits up is exact.
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _state_dict_of(obj, path):
    """The {name: _LazyTensor} mapping in the unpickled object, or a PthError."""
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        # Unwrap only when there is no choice to make: one nested state dict, under a usual name.
        nested = [k for k, v in obj.items() if _is_state_dict(v)]
        if len(nested) == 1 and nested[0] in _WRAPPER_KEYS:
            logger.info('%s: using the state dict under %r', path, nested[0])
            return obj[nested[0]]
        keys = ', '.join(repr(k) for k in list(obj)[:8]) + (', ...' if len(obj) > 8 else '')
        raise PthError(path, f'a dict with keys [{keys}] is not a state dict {{name: tensor}} and does not '
                             f'wrap exactly one (under {" / ".join(map(repr, _WRAPPER_KEYS))})')
    raise PthError(path, f'holds a {type(obj).__name__}, not a state dict {{name: tensor}}')


def _is_state_dict(obj):
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, _LazyTensor) for k, v in obj.items()))


def _materialize(tensor, storages, uses, name, path):
    """The tensor's values as a C-contiguous array of its own.

    A tensor that is exactly its whole storage, used by no other tensor, is a
    reshape of the storage buffer (no copy); anything else -- slices,
    transposes, storages shared between tensors -- is copied out through its
    strides.
    """
    base = storages[tensor.storage.key]
    offset = tensor.storage.start + tensor.offset
    size, stride = tensor.size, tensor.stride
    numel = int(np.prod(size, dtype=np.int64))
    if len(size) != len(stride) or offset < 0 or min(size + stride, default=0) < 0:
        raise PthError(path, f'corrupt tensor {name!r}: size {size}, stride {stride}, offset {offset}')
    if numel == 0:
        return np.empty(size, base.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= base.size:
        raise PthError(path, f'corrupt tensor {name!r}: size {size}, stride {stride} and offset {offset} '
                             f'reach element {last} of a {base.size}-element storage')
    if _is_contiguous(size, stride) and offset == 0 and numel == base.size and uses[tensor.storage.key] == 1:
        return base.reshape(size)
    view = np.lib.stride_tricks.as_strided(
        base[offset:], shape=size, strides=tuple(s * base.itemsize for s in stride), writeable=False)
    return np.array(view, order='C')


def _is_contiguous(size, stride):
    """Whether a (size, stride) layout is C order (strides of size-1 dims are free)."""
    step = 1
    for n, s in zip(reversed(size), reversed(stride)):
        if n != 1 and s != step:
            return False
        step *= n
    return True
