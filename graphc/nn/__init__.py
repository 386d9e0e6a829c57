"""gc.nn: layers with PyTorch's signatures; a layer called on a symbolic tensor returns a tensor."""
from .module import Module, ModuleDict, ModuleList, Residual, Sequential  # noqa: F401
from .layers import (ELU, GELU, SELU, AvgPool2D, BasicBlock, BatchNorm, BatchNorm1D, BatchNorm2D,  # noqa: F401
                     Conv1D, Conv2D, Dense, Dropout, Embedding, Flatten, Lambda, LayerNorm, LeakyReLU, Linear,
                     LPPool2D, Maxout, MaxPool2D, NoisyReLU, ReLU, Sigmoid, Softmax, Softplus, Tanh)
from .recurrent import GRU, LSTM, RNN  # noqa: F401
from ..ops import nn_ops as functional  # noqa: F401
