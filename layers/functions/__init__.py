"""Detection-time functions (decode + NMS)."""
from layers.functions.detection import Detect

__all__ = ['Detect']
