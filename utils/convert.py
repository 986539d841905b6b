"""Reference (PyTorch) state dict -> Paddle state dict: an explicit rename/drop table.

The Paddle modules keep the reference's parameter names, so conversion is a
fixed set of renames (BatchNorm statistics) and drops (bookkeeping and
obsolete keys), followed by a strict check against the target model: every
source key must be used, every target key filled, every shape equal.
"""
import re

import numpy as np

# (pattern, replacement) applied to each source key, first match wins.
RENAMES = (
    (re.compile(r'\.running_mean$'), '._mean'),
    (re.compile(r'\.running_var$'), '._variance'),
)

# Keys never carried over, with the reason shown in the report.
DROPS = (
    (re.compile(r'\.num_batches_tracked$'), 'BatchNorm step counter (Paddle keeps none)'),
    # Reference backward compatibility: pre-1.0 checkpoints named stages backbone.layer1..4.
    (re.compile(r'^backbone\.layer\d'), 'obsolete reference backbone name (backbone.layerN)'),
)


class ConversionError(ValueError):
    """The source does not fit the target; lists every offending key by name."""

    def __init__(self, unused, missing, mismatched, context=''):
        self.unused, self.missing, self.mismatched = unused, missing, mismatched
        lines = [f'state dict does not match the model{context}:']
        if mismatched:
            lines.append(f'  {len(mismatched)} shape mismatch(es) (source -> target):')
            lines += [f'    {k}: {tuple(s)} -> {tuple(t)}' for k, s, t in mismatched]
        if unused:
            lines.append(f'  {len(unused)} source key(s) with no target:')
            lines += [f'    {k}' for k in unused]
        if missing:
            lines.append(f'  {len(missing)} target key(s) missing from the source:')
            lines += [f'    {k}' for k in missing]
        super().__init__('\n'.join(lines))


def fpn_downsample_drop(num_downsample):
    """Drop rule for ``fpn.downsample_layers.N`` with N >= num_downsample.

    The reference's own loader discards these: v1.0 checkpoints carry more
    downsample layers than the configs use.
    """
    def rule(key):
        m = re.match(r'^fpn\.downsample_layers\.(\d+)\.', key)
        return bool(m) and int(m.group(1)) >= num_downsample
    return rule, f'fpn.downsample_layers beyond num_downsample={num_downsample}'


def convert_state_dict(source, target_shapes, extra_drops=(), context=''):
    """Rename and check a reference state dict against a Paddle model.

    Args:
        source: {reference key: np.ndarray}.
        target_shapes: {paddle key: shape} of the model to load into
            (``{k: v.shape for k, v in model.state_dict().items()}``).
        extra_drops: (predicate(key) -> bool, reason) pairs, e.g. ``fpn_downsample_drop(2)``.
        context: text appended to the error's first line (e.g. the file and config).
    Returns:
        ({paddle key: np.ndarray}, [(dropped source key, reason)]).
    Raises:
        ConversionError naming every unused source key, missing target key and
        shape mismatch.
    """
    out, dropped, unused, mismatched, seen = {}, [], [], [], set()
    for key, value in source.items():
        reason = next((why for pat, why in DROPS if pat.search(key)), None)
        reason = reason or next((why for pred, why in extra_drops if pred(key)), None)
        if reason:
            dropped.append((key, reason))
            continue
        new_key = _renamed(key)
        if new_key not in target_shapes:
            unused.append(key)
            continue
        seen.add(new_key)
        value = np.asarray(value)
        if tuple(value.shape) != tuple(target_shapes[new_key]):
            mismatched.append((key, value.shape, target_shapes[new_key]))
            continue
        out[new_key] = value
    missing = [k for k in target_shapes if k not in seen]
    if unused or missing or mismatched:
        raise ConversionError(unused, missing, mismatched, context)
    return out, dropped


def _renamed(key):
    """The Paddle name of a reference key (first matching rename, else unchanged)."""
    for pat, repl in RENAMES:
        if pat.search(key):
            return pat.sub(repl, key)
    return key
