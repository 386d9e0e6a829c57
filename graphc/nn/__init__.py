"""gc.nn: layers."""
from .recurrent import GRU, LSTM, RNN  # noqa: F401
