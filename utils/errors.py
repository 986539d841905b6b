"""The project's one error policy.

An error in what the user gave us (an unknown config, weights that do not fit
it, a missing or malformed file, a bad dataset entry) is a :class:`YolactError`:
every program prints its message as one line and exits with status 1.
Anything else is a bug and keeps its traceback.

The subclasses also derive from the built-in exception a caller would expect
(``ValueError`` for bad values, ``FileNotFoundError`` for missing files), so
library users can catch either.
"""
import logging
import sys

logger = logging.getLogger(__name__)

# Exit status of a program stopped by the user's input, by Ctrl+C (128 + SIGINT) and by SIGTERM (128 + SIGTERM).
EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class YolactError(Exception):
    """An error in the user's input; the message names the file, key or entry at fault."""


class ConfigError(YolactError, ValueError):
    """An unknown config name or flags that contradict each other."""


class WeightsError(YolactError, ValueError):
    """A weights file that cannot be read, or does not fit the network it is loaded into."""


class DatasetError(YolactError, ValueError):
    """A missing, malformed or inconsistent annotation file or dataset entry."""


class MissingFileError(YolactError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class UnreadableFileError(YolactError, OSError):
    """A file that exists but cannot be read as what it should be (a corrupt image or video, ...)."""


class ImageInputError(YolactError, ValueError):
    """An image array that cannot be taken without guessing what its values mean (see utils.predictor)."""


class OutputError(YolactError, OSError):
    """An output cannot be written (read-only folder, disk full, ...); says what was kept."""


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception (utils.runtime.sigterm_as_interrupt): stopped as Ctrl+C stops, exit 143."""


def run_cli(main, argv=None):
    """Run a program's ``main(argv) -> exit status`` under the error policy; returns the exit status.

    A :class:`YolactError` prints ``error: <message>`` on stderr (one line)
    and gives EXIT_USER_ERROR; Ctrl+C gives EXIT_INTERRUPTED, SIGTERM (as
    :class:`Terminated`) EXIT_TERMINATED; every other exception propagates
    with its traceback.
    """
    try:
        return main(argv)
    except YolactError as err:
        print(f'error: {err}', file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except Terminated:
        print('terminated', file=sys.stderr, flush=True)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
