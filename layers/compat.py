"""What differs between the supported Paddle versions (2.6 to 3.3), in one place.

A model module that imports only Paddle, so that the model and the library share one set of shims.
Each shim names the versions that need it; the newest Paddle takes the plain call.

* ``Layer.train(mode)``: 2.6-3.2's ``Layer.train()`` takes no argument.
* ``paddle.argsort(stable=True)``: absent in 2.6.
* Paddle Inference's ``Config.enable_onednn``: absent before 3.2 (named ``enable_mkldnn`` there).
* ``F.interpolate(mode='bilinear')``: before 3.3 its sample positions are up
  to 1.5e-5 px off PyTorch's (values up to 1.4e-5 of their range on a
  480x640 -> 550x550 resize), so the preprocessing uses the exact taps of
  layers.interpolate.linear_taps there (:data:`BILINEAR_AS_TORCH`).
* ``paddle.jit.save`` writes a PIR program (``.json``) from 3.0 on and an
  older ``.pdmodel`` program on 2.6 (utils.deploy.network_export reads both).
* Paddle Inference's ``Predictor.run(inputs)`` with tensors crashes 2.6
  (SIGSEGV converting its outputs): :func:`predictor_run`.
"""
import inspect

import paddle


def _version():
    """(major, minor) of the installed Paddle; a develop build (0.0.0) counts as the newest."""
    parts = [int(p) for p in paddle.__version__.split('.')[:2] if p.isdigit()]
    version = tuple(parts + [0] * (2 - len(parts)))
    return (99, 0) if version == (0, 0) else version


PADDLE_VERSION = _version()
# From 3.3 on Paddle's bilinear kernel meets the reference fixtures' 2e-6 preprocessing tolerance;
# before, a 480x640 -> 550 resize is off PyTorch's by up to 1.4e-5 of the value range.
BILINEAR_AS_TORCH = PADDLE_VERSION >= (3, 3)
_TRAIN_TAKES_MODE = 'mode' in inspect.signature(paddle.nn.Layer.train).parameters
_ARGSORT_HAS_STABLE = 'stable' in inspect.signature(paddle.argsort).parameters


def layer_train(layer, mode=True):
    """``paddle.nn.Layer.train(layer, mode)`` on every version (for overrides calling the base class).

    Before 3.3 the base method takes no argument and ``Layer.eval`` does what
    ``train(False)`` does; neither calls an override, so this cannot recurse.
    """
    if _TRAIN_TAKES_MODE:
        paddle.nn.Layer.train(layer, mode)
    elif mode:
        paddle.nn.Layer.train(layer)
    else:
        paddle.nn.Layer.eval(layer)


def argsort_stable(x, axis, descending, keys=None):
    """``paddle.argsort(x, axis, descending, stable=True)``.

    Paddle 2.6 has no stable sort: there ``keys(x)``, a tensor of the shape of
    ``x`` with unique values within each sorted line that order as the
    stable order does (e.g. layers.functions.detection._rank_keys), is sorted
    instead; equal values then cannot be reordered.
    """
    if _ARGSORT_HAS_STABLE:
        return paddle.argsort(x, axis=axis, descending=descending, stable=True)
    if keys is None:
        raise NotImplementedError(f'Paddle {paddle.__version__} has no stable argsort; pass keys')
    return paddle.argsort(keys(x), axis=axis, descending=descending)


def predictor_run(predictor, inputs):
    """``predictor.run(inputs)``: a Paddle Inference predictor on paddle tensors, its outputs as paddle tensors.

    On 2.6 the inputs are shared with the predictor (no copy) and the outputs
    are copied through the host to the first input's place: a device to host
    copy per run on a GPU, which 3.0 and later avoid.
    """
    if PADDLE_VERSION >= (3, 0):
        return predictor.run(inputs)
    for name, x in zip(predictor.get_input_names(), inputs):
        predictor.get_input_handle(name).share_external_data(x)
    predictor.run()
    place = inputs[0].place
    return [paddle.to_tensor(predictor.get_output_handle(name).copy_to_cpu(), place=place)
            for name in predictor.get_output_names()]


def enable_onednn(config, cache_capacity=0):
    """Paddle Inference config: oneDNN on (``enable_mkldnn`` before 3.2), with a bounded shape cache if > 0."""
    if hasattr(config, 'enable_onednn'):
        config.enable_onednn()
        if cache_capacity > 0:
            config.set_onednn_cache_capacity(cache_capacity)
    else:
        config.enable_mkldnn()
        if cache_capacity > 0:
            config.set_mkldnn_cache_capacity(cache_capacity)
