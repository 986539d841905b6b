"""Reading what a child process (paddle2onnx's conversion, an export's first-use check) said when it failed.

Both run in a child so that an abort or a segfault in Paddle's C++ cannot take
the calling process down; these helpers turn its output into one line.
"""
import re
import signal


def strip_ansi(text):
    """Text without the terminal colour codes paddle2onnx and Paddle write around their messages."""
    return re.sub(r'\x1b\[[0-9;]*m', '', text)


def signal_name(number):
    """'SIGSEGV' for 11; 'signal N' for a number that names no signal."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f'signal {number}'
