"""The library: data loading helpers, inference, evaluation, training, weights, deployment.

Importing it silences Paddle's "No ccache found" import warning (only that
one; utils.runtime.quiet_paddle_import) for library users too, e.g.
``from utils.predictor import Predictor`` in a notebook.
"""
from utils.runtime import quiet_paddle_import

quiet_paddle_import()
