"""Recurrent cells: one transition g per module, all on the `Cell` base."""

from rnnlab.cells.antisymmetric import AntisymmetricRNN
from rnnlab.cells.base import Cell, State, check_state_names, state_keys
from rnnlab.cells.cornn import CoRNN
from rnnlab.cells.gated import GRU, LSTM
from rnnlab.cells.indrnn import IndRNN
from rnnlab.cells.lem import LEM
from rnnlab.cells.lru import LRU
from rnnlab.cells.mingru import MinGRU
from rnnlab.cells.ode import NeuralODE
from rnnlab.cells.rnn import ElmanRNN

__all__ = ["GRU", "LEM", "LRU", "LSTM", "AntisymmetricRNN", "Cell", "CoRNN", "ElmanRNN",
           "IndRNN", "MinGRU", "NeuralODE", "State", "check_state_names", "state_keys"]
