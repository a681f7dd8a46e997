"""Recurrent cells: one transition g per module, all on the `Cell` base."""

from rnnlab.cells.base import Cell, State
from rnnlab.cells.gated import GRU, LSTM
from rnnlab.cells.ode import NeuralODE
from rnnlab.cells.rnn import ElmanRNN

__all__ = ["GRU", "LSTM", "Cell", "ElmanRNN", "NeuralODE", "State"]
