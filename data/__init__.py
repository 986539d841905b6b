"""Datasets, configs and transforms. Importing it silences Paddle's "No ccache found" import warning
(only that one; utils.runtime.quiet_paddle_import), as the programs do."""
from utils.runtime import quiet_paddle_import

quiet_paddle_import()
