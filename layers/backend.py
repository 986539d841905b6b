"""Where the host and the device paths part: the one switch of MultiBoxLoss, Detect, PostProcess,
``box_utils.match`` and the Trainer.

Each of them has two implementations that give the same results:

* the host path: numpy, ``nonzero``/``gather`` selections and Python decisions on
  tensor values, the fastest on a CPU;
* the device path: Paddle ops only, nothing copied to the host before the final
  masks, so a GPU never waits; forced onto the CPU in the tests, to check it
  against the host path there.

``backend`` chooses: 'auto' follows the tensors (on a GPU: the device path,
else the host path); 'device' / 'host' force one.
"""

BACKENDS = ('auto', 'device', 'host')


def check_backend(backend):
    """``backend`` when it is one of :data:`BACKENDS`; ValueError naming it otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
    return backend


def use_device_path(tensor, backend='auto'):
    """True when the device path (all-Paddle, no host copy) should process ``tensor``."""
    if backend == 'auto':
        return tensor.place.is_gpu_place()
    return backend == 'device'
