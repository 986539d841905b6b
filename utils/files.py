"""Outputs that appear whole or not at all: the one way this project writes a file or a folder of files.

A file is written under a temporary name beside its final one (same file
system), flushed to disk and renamed over the final name in one step
(:class:`AtomicFile`, :func:`atomic_write`, :func:`atomic_paddle_save`); a
folder of files is built in a :func:`staging_folder` beside its destination and
moved into place. A writer that fails or is killed leaves the previous file (or
none), never a truncated one under the final name; concurrent writers of one
name cannot interleave (the last to finish wins whole). A file's errors are the
failing call's OSError: each caller turns it into an OutputError that names its output.
Importing this module imports no Paddle.
"""
import contextlib
import io
import os
import shutil
import tempfile

from utils.errors import OutputError

TMP_SUFFIX = '.tmp'


class AtomicFile:
    """``path`` written through a temporary file beside it.

    :meth:`commit` completes it (flush, fsync, rename over ``path``, fsync of the
    folder); :meth:`discard` drops it and leaves ``path`` as it was. As a context
    manager it gives the open file and commits on success, discards on an exception.

    Args:
        path: the final name; its folder must exist.
        mode: 'wb' (default) or 'w' (text).
    Attributes:
        file: the open temporary file (write to it).
        tmp_path: its name, ``.<name>.<random>.tmp`` in the same folder.
    """

    def __init__(self, path, mode='wb'):
        self.path = path
        self.folder, name = os.path.split(os.path.abspath(path))
        fd, self.tmp_path = tempfile.mkstemp(prefix=f'.{name}.', suffix=TMP_SUFFIX, dir=self.folder)
        # mkstemp creates the file private; outputs get the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp_path, 0o666 & ~umask)
        self.file = os.fdopen(fd, mode)

    def commit(self):
        """Move the complete file to ``path`` (a second call does nothing); on failure nothing is left."""
        if self.file.closed:
            return
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp_path, self.path)
        except BaseException:
            self.discard()
            raise
        fsync_folder(self.folder)

    def discard(self):
        """Drop the temporary file; ``path`` keeps whatever it had before."""
        if not self.file.closed:
            self.file.close()
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def atomic_write(path, data):
    """Replace ``path`` with ``data`` (bytes, or str written as text) in one step."""
    with AtomicFile(path, 'wb' if isinstance(data, bytes) else 'w') as f:
        _write_all(f, data)


def _write_all(f, data):
    """Write ``data`` to the open file ``f`` (a separate step so tests can interrupt it)."""
    f.write(data)


def atomic_paddle_save(obj, path):
    """``paddle.save(obj, path)``, atomically (the bytes are serialised in memory first)."""
    import paddle
    buf = io.BytesIO()
    paddle.save(obj, buf)
    atomic_write(path, buf.getvalue())


def fsync_folder(folder):
    """Persist the renames in ``folder`` themselves (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable_folder(folder, what):
    """Raise OutputError unless ``folder`` can be written; creates nothing.

    For outputs checked before long work starts (their writers create the
    folder when they first write). An existing folder must take a new file;
    a missing one, its nearest existing parent must (a probe file is made
    and removed there). The error says 'cannot write <what> to <folder>:
    <reason>' (a path under a regular file, a read-only folder or file
    system, no space for a new file).
    """
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise OutputError(f'cannot write {what} to {folder}: {path} is not a folder')
    try:
        fd, probe = tempfile.mkstemp(prefix='.write-test.', suffix=TMP_SUFFIX, dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputError(f'cannot write {what} to {folder}: {e.strerror or e}') from e


@contextlib.contextmanager
def staging_folder(folder, prefix, what):
    """A new temporary folder ``<folder>/<prefix><random>``, removed with what is left in it on exit.

    On the same file system as the outputs in ``folder``, so moving files from
    it into place is atomic. ``folder`` is created when missing; when it cannot
    be, an OutputError says 'cannot write <what> to <folder>'.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        stage = tempfile.mkdtemp(prefix=prefix, dir=folder)
    except OSError as e:
        raise OutputError(f'cannot write {what} to {folder}: {e.strerror}') from e
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)
