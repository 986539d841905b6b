"""Read ``paddle.save`` files (``.pdparams``, ``.pdopt``) without letting them run code.

What paddle.save writes (Paddle 2.6 to 3.3, pickle protocol 2 to 4):

* a Layer's or an optimizer's state dict (a dict whose values are tensors or
  plain dicts): the dict with every tensor as a numpy array, plus
  ``'StructuredToParameterName@@'`` {key: tensor name}; under protocol 2/3,
  arrays over 1 GB are split into ``<key>@@.<i>`` slices listed in
  ``'UnpackBigParamInfor@@'`` (sic);
* any other nesting of dicts/lists (our ``.pdopt``: {'accumulators': ...,
  'grad_scaler': ...}): the structure with every tensor as a
  ``(name, numpy array)`` tuple.

Besides dicts, lists, tuples, strings and numbers (no globals needed), the
pickle then names only: ``numpy.ndarray``, ``numpy.dtype``,
``numpy[._]core.multiarray._reconstruct`` / ``.scalar`` (numpy 1.x writes
``numpy.core``, 2.x ``numpy._core``), ``builtins.tuple`` (``__builtin__`` under
protocol 2), ``_codecs.encode`` (bytes under protocol 2) and
``collections.OrderedDict``. Those are the allow-list (utils.weights.safe_pickle).

numpy's own unpickling hooks are not run on the file's data either: the
dtype and array globals resolve to stand-ins that record their arguments,
and after unpickling each array is rebuilt from its recorded bytes with a
plain numeric dtype (bool, integers, floats, complex; no object or structured
dtypes), its byte count checked against its shape. The result is then
converted as ``paddle.load`` converts it (tensors, or numpy arrays with
``return_numpy``).
"""
import collections

import numpy as np
import paddle

from utils.weights.safe_pickle import PickleFileError, RestrictedUnpickler, StandIn, unpickle

_NAME_TABLE = 'StructuredToParameterName@@'
_BIG_PARAM_TABLE = 'UnpackBigParamInfor@@'  # paddle's spelling
_NUMERIC_KINDS = 'biufc'
# Containers nested deeper than this are no state dict (and would exhaust the recursion).
_MAX_DEPTH = 64


class PaddleFileError(PickleFileError):
    """A file that cannot be read as a paddle.save state dict; says which file and why."""


class _DtypeSpec:
    """What ``numpy.dtype(spec, align, copy)`` plus its pickled state record, unchecked."""

    def __init__(self, spec, *_flags):
        self.spec, self.state = spec, None

    def __setstate__(self, state):
        self.state = state


class _ArraySpec:
    """What ``_reconstruct(ndarray, (0,), b'b')`` plus the array's pickled state record, unchecked."""

    def __init__(self, *_args):
        self.state = None

    def __setstate__(self, state):
        self.state = state


class _NdarrayMarker:
    """Stands for the ``numpy.ndarray`` class, which only ``_reconstruct`` may take."""
    __slots__ = ()

    def __setstate__(self, state):
        raise TypeError('numpy.ndarray cannot be given a state')


_NDARRAY = _NdarrayMarker()


def _reconstruct(cls, *_args):
    if cls is not _NDARRAY:
        raise TypeError(f'_reconstruct of {type(cls).__name__}, not of numpy.ndarray')
    return _ArraySpec()


def _scalar(dtype_spec, data):
    """Stand-in for numpy's scalar(dtype, bytes): a numpy scalar (LR scheduler states may hold them)."""
    dtype = _checked_dtype(dtype_spec)
    data = _as_bytes(data)
    if len(data) != dtype.itemsize:
        raise ValueError(f'a {dtype} scalar of {len(data)} bytes')
    return np.frombuffer(data, dtype)[0]


def _encode(text, encoding):
    """Stand-in for _codecs.encode, which protocol 2 uses to write bytes as latin-1 text."""
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise TypeError(f'_codecs.encode({type(text).__name__}, {encoding!r})')
    return text.encode('latin1')


_ALLOWED_GLOBALS = {
    ('collections', 'OrderedDict'): StandIn(collections.OrderedDict),
    ('builtins', 'tuple'): StandIn(tuple),
    ('__builtin__', 'tuple'): StandIn(tuple),
    ('_codecs', 'encode'): StandIn(_encode),
    ('numpy', 'ndarray'): _NDARRAY,
    ('numpy', 'dtype'): StandIn(_DtypeSpec),
}
for _core in ('numpy.core.multiarray', 'numpy._core.multiarray'):
    _ALLOWED_GLOBALS[(_core, '_reconstruct')] = StandIn(_reconstruct)
    _ALLOWED_GLOBALS[(_core, 'scalar')] = StandIn(_scalar)


class _Unpickler(RestrictedUnpickler):
    allowed = _ALLOWED_GLOBALS
    error = PaddleFileError
    refusal = 'only paddle.save state dicts (tensors, numbers, strings, lists, dicts) can be loaded'


def load_paddle_file(path, return_numpy=False):
    """The object in a paddle.save file (state dict or optimizer state), as ``paddle.load`` returns it.

    Args:
        path: a ``.pdparams`` / ``.pdopt`` written by paddle.save.
        return_numpy: tensors as numpy arrays instead of paddle Tensors.
    Returns:
        the saved dict (or other structure), tensors restored: a state dict's
        values are Tensors (or arrays) of the saved shapes and dtypes.
    Raises:
        PaddleFileError naming the file: an object outside the allow-list
        (a code payload, a pickled class), an array of a non-numeric dtype,
        truncated or corrupt data.
    """
    with open(path, 'rb') as f:
        if not f.read(1):
            raise PaddleFileError(path, 'empty file')
        f.seek(0)
        obj = unpickle(_Unpickler(f, path, encoding='latin1'), 'pickle')
    obj = _Rebuilder(path).rebuild(obj)
    return _as_paddle_load_result(obj, path, return_numpy)


class _Rebuilder:
    """Replaces every recorded array by a numpy array, and refuses anything a state dict cannot hold."""

    def __init__(self, path):
        self.path = path
        self.arrays = {}  # id(_ArraySpec) -> array: a memoised array shared by two keys is built once

    def rebuild(self, obj, depth=0):
        if depth > _MAX_DEPTH:
            raise PaddleFileError(self.path, f'containers nested deeper than {_MAX_DEPTH} levels')
        if isinstance(obj, _ArraySpec):
            if id(obj) not in self.arrays:
                self.arrays[id(obj)] = self._array(obj)
            return self.arrays[id(obj)]
        if isinstance(obj, dict):
            for key in list(obj):
                if not isinstance(key, (str, int)):
                    raise PaddleFileError(self.path, f'a dict key of type {type(key).__name__}')
                obj[key] = self.rebuild(obj[key], depth + 1)
            return obj
        if isinstance(obj, list):
            obj[:] = [self.rebuild(v, depth + 1) for v in obj]
            return obj
        if isinstance(obj, tuple):
            return tuple(self.rebuild(v, depth + 1) for v in obj)
        if obj is None or isinstance(obj, (str, bytes, bool, int, float, np.generic, np.ndarray)):
            return obj
        raise PaddleFileError(self.path, f'unsupported object of type {type(obj).__name__} in the pickle')

    def _array(self, spec):
        state = spec.state
        try:
            _version, shape, dtype_spec, fortran, data = state
            dtype = _checked_dtype(dtype_spec)
            shape = tuple(int(n) for n in shape)
            data = _as_bytes(data)
        except TypeError as exc:  # a dtype or a layout a state dict does not hold
            raise PaddleFileError(self.path, f'unsupported array: {exc}') from None
        except ValueError as exc:
            raise PaddleFileError(self.path, f'corrupt array record: {exc}') from None
        if min(shape, default=0) < 0 or len(data) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise PaddleFileError(self.path, f'corrupt array: shape {shape} of {dtype} in {len(data)} bytes')
        array = np.frombuffer(data, dtype).reshape(shape, order='F' if fortran else 'C')
        if array.dtype.isnative and array.flags.c_contiguous:
            # A read-only view of the file's bytes: a tensor copies it anyway, and
            # _as_paddle_load_result copies the arrays it returns as arrays.
            return array
        return array.astype(dtype.newbyteorder('='), order='C')


def _checked_dtype(spec):
    """The numpy dtype a recorded ``numpy.dtype`` call describes, if plain numeric."""
    if not isinstance(spec, _DtypeSpec) or not isinstance(spec.spec, str):
        raise TypeError('an array or scalar without a dtype record')
    dtype = np.dtype(spec.spec)
    if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise TypeError(f'unsupported dtype {spec.spec!r} (only numeric arrays are loaded)')
    state = spec.state
    if state is not None:
        if not isinstance(state, tuple) or len(state) < 5 or any(v is not None for v in state[2:5]):
            raise TypeError(f'unsupported dtype state {state!r}')
        if state[1] in ('<', '>'):
            dtype = dtype.newbyteorder(state[1])
    return dtype


def _as_bytes(data):
    if isinstance(data, str):  # protocol 2 files written by Python 2
        return data.encode('latin1')
    if not isinstance(data, bytes):
        raise TypeError(f'array data of type {type(data).__name__}')
    return data


def _as_paddle_load_result(obj, path, return_numpy):
    """paddle.load's conversion of an unpickled object (paddle.framework.io.load, Paddle 2.6-3.3);
    every array returned is writable and owns its memory, as numpy's unpickling gives."""
    obj = _converted(obj, path, return_numpy)
    return _convert(obj, lambda v: isinstance(v, np.ndarray) and not v.flags.writeable, np.copy)


def _converted(obj, path, return_numpy):
    if isinstance(obj, dict) and _BIG_PARAM_TABLE in obj:
        obj = _join_big_params(obj, path)
    if isinstance(obj, dict) and _NAME_TABLE in obj:
        names = obj.pop(_NAME_TABLE)
        if not isinstance(names, dict):
            raise PaddleFileError(path, f'corrupt {_NAME_TABLE} record')
        for key, name in names.items():
            if isinstance(obj.get(key), np.ndarray):
                obj[key] = _tensor(obj[key], name, return_numpy)
        return obj
    # Without a name table the tensors are (name, array) tuples; a file that has
    # none holds bare arrays (as paddle.save writes a DenseTensor), each a tensor.
    if _contains(obj, _is_named_array):
        return _convert(obj, _is_named_array, lambda t: _tensor(t[1], t[0], return_numpy))
    return _convert(obj, lambda v: isinstance(v, np.ndarray), lambda a: _tensor(a, None, return_numpy))


def _join_big_params(obj, path):
    """Reassemble the arrays that paddle.save split into slices (protocol 2/3, over 1 GB)."""
    info = obj.pop(_BIG_PARAM_TABLE)
    try:
        for key, record in info.items():
            slices = [obj.pop(part) for part in record['slices']]
            obj[key] = np.concatenate(slices).reshape(record['OriginShape'])
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise PaddleFileError(path, f'corrupt {_BIG_PARAM_TABLE} record: {type(exc).__name__}: {exc}') from None
    return obj


def _is_named_array(value):
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) \
        and isinstance(value[1], np.ndarray)


def _contains(obj, test):
    if test(obj):
        return True
    if isinstance(obj, dict):
        return any(_contains(v, test) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_contains(v, test) for v in obj)
    return False


def _convert(obj, test, convert):
    if test(obj):
        return convert(obj)
    if isinstance(obj, dict):
        for key in obj:
            obj[key] = _convert(obj[key], test, convert)
        return obj
    if isinstance(obj, list):
        obj[:] = [_convert(v, test, convert) for v in obj]
        return obj
    if isinstance(obj, tuple):
        return tuple(_convert(v, test, convert) for v in obj)
    return obj


def _tensor(array, name, return_numpy):
    if return_numpy:
        return array
    tensor = paddle.to_tensor(array)
    if name:
        tensor.name = name
    return tensor
