"""All op definitions; importing this package registers every op in graphc.ir.OPS.

Each module holds whole op definitions (shape/dtype rule, NumPy reference, gradient rules, traits);
backend spellings live in the backends' lowering tables, keyed by the op objects defined here. The functions here are the public constructors re-exported as gc.<name>.
"""
from .core import (Parameter, as_tensor, cast, constant, parameter, placeholder, scalar_like,  # noqa: F401
                   stop_gradient)
from .elementwise import (abs, add, atan, clip, cos, div, equal, erf, exp, expm1, floor, greater,  # noqa: F401
                          greater_equal, leaky_relu, less, less_equal, log, log1p, logical_and, logical_or,
                          maximum, minimum, mul, neg, not_equal, ones_like, pow, reciprocal, relu, rsqrt,
                          sigmoid, sign, sin, softplus, sqrt, square, sub, tanh, where, zeros_like)
from .elementwise import (acos, acosh, asin, asinh, atanh, bitwise_and, bitwise_not, bitwise_or,  # noqa: F401
                          bitwise_xor, ceil, cosh, floor_divide, fmod, invert, isfinite, isinf, isnan, left_shift,
                          mod, right_shift, round, sinh, tan, trunc)
from .reduce import (argmax, argmin, log_softmax, logsumexp, max, mean, min, prod, softmax, std,  # noqa: F401
                     sum, var)
from .shape_ops import (broadcast_to, concatenate, expand_dims, flatten, getitem, reshape, size_of,  # noqa: F401
                        squeeze, stack, sum_to, swapaxes, take, transpose)
from .linalg import dot, matmul  # noqa: F401
from .fused import Fused, fused  # noqa: F401,E402
from .scan import scan  # noqa: F401,E402
from .nn_ops import (avg_pool1d, avg_pool2d, batch_norm, conv1d, conv2d, dropout, elu, embedding,  # noqa: F401,E402
                     gelu, global_avg_pool2d, hardtanh, heaviside, layer_norm, lp_pool2d, max_pool1d,
                     max_pool2d, maxout, noisy_relu, one_hot, prelu, selu, soft_maxout, softsign)
from .nn_ops import avg_pool3d, conv3d, conv_transpose2d, max_pool3d  # noqa: F401,E402
from .nn_ops import pnorm_pool, rbf  # noqa: F401,E402
from .nn_ops import affine_grid, grid_sample, rms_norm, rotary_embedding  # noqa: F401,E402
from .linalg_solve import solve  # noqa: F401,E402
from .quant import (conv_integer, dequantize_linear, dynamic_quantize_linear, matmul_integer,  # noqa: F401,E402
                    qlinear_conv2d, qlinear_matmul, quantize_linear)
from .cumulative import cumsum  # noqa: F401,E402
from .einsum import diagonal, einsum  # noqa: F401,E402
from .attention import scaled_dot_product_attention  # noqa: F401,E402
from . import tensor_methods  # noqa: F401,E402
