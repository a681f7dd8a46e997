"""Recurrent cells: one transition g per module, all on the `Cell` base."""

from rnnlab.cells.base import Cell, State
from rnnlab.cells.rnn import ElmanRNN

__all__ = ["Cell", "ElmanRNN", "State"]
