"""Synthetic long-sequence tasks: one LightningDataModule per module, all on the `Task` base."""

from rnnlab.tasks.adding import Adding
from rnnlab.tasks.base import Batch, Task

__all__ = ["Adding", "Batch", "Task"]
