"""The project's one restricted unpickler: reading a weights file can never run code.

A pickle names every callable it needs as a global (``module.name``), which
the unpickler resolves through ``find_class`` and then calls; a ``__reduce__``
payload is nothing but such a global (``os.system``, ``builtins.exec``, ...).
:class:`RestrictedUnpickler` resolves only the globals of an allow-list, each
to a stand-in written here, and refuses every other one with one line naming
the file and the object. Readers of a format (utils.weights.pth_reader for torch.save
files, utils.weights.paddle_reader for paddle.save files) subclass it with their
allow-list; :func:`unpickle` turns every failure into the same one-line error.
"""
import os
import pickle

from utils.errors import WeightsError


class PickleFileError(WeightsError):
    """A pickled weights file that cannot be read safely; the message names the file and why."""

    def __init__(self, path, what):
        self.path = path
        super().__init__(f'{os.path.basename(path)}: {what}')


class StandIn:
    """An allow-listed global as a pickle gets it: callable, and immune to BUILD.

    The BUILD opcode sets attributes on any object the pickle holds; on a
    function or class of ours (or ``collections.OrderedDict``) that change would
    outlive the load. A StandIn has no attributes to set and refuses a state.
    """
    __slots__ = ('_target',)

    def __init__(self, target):
        object.__setattr__(self, '_target', target)

    def __call__(self, *args):
        return self._target(*args)

    def __setattr__(self, name, value):
        raise AttributeError(f'{self!r} is read-only')

    def __setstate__(self, state):
        raise TypeError(f'{self!r} cannot be given a state')

    def __repr__(self):
        return f'StandIn({getattr(self._target, "__name__", self._target)!r})'


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ``allowed`` globals.

    Subclasses set ``allowed`` ({(module, name): StandIn or BUILD-proof marker}), ``error`` (a
    PickleFileError subclass, called with (path, message)) and ``refusal``
    (what the format may hold, said when refusing). Persistent ids are
    refused unless a subclass handles them.
    """
    allowed = {}
    error = PickleFileError
    refusal = 'only state dicts can be read'

    def __init__(self, file, path, encoding='ASCII'):
        super().__init__(file, encoding=encoding)
        self.path = path

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except (KeyError, TypeError):
            raise self.error(self.path, f'unsupported object {module}.{name} in the pickle: '
                                        f'{self.refusal}') from None

    def persistent_load(self, pid):
        raise self.error(self.path, f'unsupported persistent object {pid!r} in the pickle')


def unpickle(unpickler, what='pickle'):
    """``unpickler.load()``, every failure turned into ``unpickler.error`` naming the file.

    what: the part of the file being read, for the message ('object pickle', 'header', ...).
    """
    error, path = unpickler.error, unpickler.path
    try:
        return unpickler.load()
    except PickleFileError:
        raise
    except (EOFError, pickle.UnpicklingError) as exc:
        # The C unpickler reports a stream that stops early as EOFError or as
        # UnpicklingError('pickle data was truncated'), depending on where it stops.
        if isinstance(exc, EOFError) or 'truncated' in str(exc):
            raise error(path, f'truncated: the file ends inside the {what}') from None
        raise error(path, f'corrupt {what}: {exc}') from None
    except Exception as exc:  # a damaged pickle can raise almost any exception type
        raise error(path, f'corrupt {what}: {type(exc).__name__}: {exc}') from None
