"""Synthetic long-sequence tasks: one LightningDataModule per module, all on the `Task` base."""

from rnnlab.tasks.adding import Adding
from rnnlab.tasks.associative_recall import AssociativeRecall
from rnnlab.tasks.base import Batch, Task
from rnnlab.tasks.copy import Copy
from rnnlab.tasks.oscillator import Oscillator
from rnnlab.tasks.selective_copy import SelectiveCopy
from rnnlab.tasks.temporal_order import TemporalOrder

__all__ = ["Adding", "AssociativeRecall", "Batch", "Copy", "Oscillator", "SelectiveCopy", "Task",
           "TemporalOrder"]
