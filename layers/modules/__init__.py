"""Training-time modules."""
from layers.modules.multibox_loss import MultiBoxLoss

__all__ = ['MultiBoxLoss']
