"""gc.nn: layers with PyTorch's signatures; a layer called on a symbolic tensor returns a tensor."""
from .module import Module, ModuleDict, ModuleList, Residual, Sequential  # noqa: F401
from .layers import (ELU, GELU, SELU, AvgPool1D, AvgPool2D, BasicBlock, BatchNorm, BatchNorm1D,  # noqa: F401
                     BatchNorm2D, Conv1D, Conv2D, Dense, Dropout, Embedding, Flatten, GlobalAvgPool2D,
                     Hardtanh, Lambda, LayerNorm, LeakyReLU, Linear, LPPool2D, Maxout, MaxPool1D, MaxPool2D,
                     NoisyReLU, PReLU, ReLU, RMSNorm, Sigmoid, Softmax, Softplus, Softsign, Tanh)
from .recurrent import GRU, LSTM, RNN  # noqa: F401
from .conv import AvgPool3D, Conv3D, ConvTranspose2D, MaxPool3D  # noqa: F401
from .attention import (MultiheadAttention, TransformerEncoder, TransformerEncoderLayer,  # noqa: F401
                        multi_head_attention)
from .units import RBF, Highway, PNormPool  # noqa: F401
from ..ops import nn_ops as functional  # noqa: F401
