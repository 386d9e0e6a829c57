"""Recurrent layers RNN, LSTM, GRU on (N, T, C) input, built on gc.scan (one loop node per layer
and direction, differentiated by back-propagation through time).

Parameters follow PyTorch's names, shapes and gate layout, so `layer.load_state_dict(
{k: v.numpy() for k, v in torch_lstm.state_dict().items()})` copies a torch.nn.LSTM's weights::

  weight_ih_l{k}[_reverse] (G*H, in), weight_hh_l{k}[_reverse] (G*H, H),
  bias_ih_l{k}[_reverse] (G*H,), bias_hh_l{k}[_reverse] (G*H,)

with G gates stacked in torch's order: LSTM (i, f, g, o), GRU (r, z, n), RNN (one).
"""
from __future__ import annotations

import math

import numpy as np

from graphc import ops as F
from .. import init as _init
from .. import shapes as _sh
from ..errors import GraphcError, ShapeError
from ..ops.core import Parameter, as_tensor, constant, parameter
from .module import Module


class _Recurrent(Module):
    """Shared machinery: parameters, layer/direction stacking, input projection hoisted out of the loop.

    A gc.nn.Module (`.train()`/`.eval()`, state dicts, registered when assigned to a parent module);
    each layer draws its own initial weights (like Dense) unless `seed` is given."""

    gates = 1
    kind = "RNN"
    returns_state = True

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = False,
                 bias: bool = True, dtype: str = "float32", seed: int | None = None):
        super().__init__()   # prefix: graph names lstm0.weight_ih_l0, lstm1....
        sizes = (input_size, hidden_size, num_layers)
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in sizes) or min(sizes) < 1:
            raise GraphcError(f"{self.kind}: input_size, hidden_size and num_layers must be integers >= 1, got "
                              f"{input_size!r}, {hidden_size!r}, {num_layers!r}")
        self.input_size, self.hidden_size, self.num_layers = int(input_size), int(hidden_size), int(num_layers)
        self.bidirectional, self.bias, self.dtype = bool(bidirectional), bool(bias), dtype
        self.num_directions = 2 if bidirectional else 1
        rng = np.random.default_rng(seed) if seed is not None else _init._gen()
        bound = 1.0 / math.sqrt(hidden_size)  # torch's default: U(-1/sqrt(H), 1/sqrt(H)) for every tensor
        for k in range(num_layers):
            n_in = input_size if k == 0 else hidden_size * self.num_directions
            for sfx in self._suffixes():
                for name, shape in self._shapes(k, sfx, n_in):  # named_params: torch name -> parameter
                    self.named_params[name] = parameter(f"{self.prefix}.{name}", rng.uniform(-bound, bound, shape),
                                                        dtype)

    def _suffixes(self):
        return ("", "_reverse") if self.bidirectional else ("",)

    def _shapes(self, k, sfx, n_in):
        G, H = self.gates * self.hidden_size, self.hidden_size
        out = [(f"weight_ih_l{k}{sfx}", (G, n_in)), (f"weight_hh_l{k}{sfx}", (G, H))]
        if self.bias:
            out += [(f"bias_ih_l{k}{sfx}", (G,)), (f"bias_hh_l{k}{sfx}", (G,))]
        return out

    @property
    def params(self) -> list[Parameter]:
        """Trainable parameters in PyTorch's state_dict order."""
        return list(self.named_params.values())

    # ---- the forward computation ------------------------------------------------------------------

    def __call__(self, x, state=None, training: bool | None = None):
        """x (N, T, input_size) -> (outputs (N, T, H * dirs), final state); the state is h
        (layers * dirs, N, H) (LSTM: (h, c)), like torch with batch_first=True. `training` is accepted
        like every module's (the recurrent layers behave the same in both modes)."""
        return self.forward(x, self.training if training is None else bool(training), state)

    def forward(self, x, training: bool, state=None):
        x = as_tensor(x)
        if x.ndim != 3 or not (isinstance(x.shape[2], int) and x.shape[2] == self.input_size):
            raise ShapeError(f"{self.kind}: input {x.label} has shape {x.shape}, expected (N, T, {self.input_size})")
        n = x.shape[0]
        seq, finals = F.transpose(x, (1, 0, 2)), []  # time-major: scan runs over axis 0
        for k in range(self.num_layers):
            outs = []
            for d, sfx in enumerate(self._suffixes()):
                init = self._init_state(state, k * self.num_directions + d, n, x.dtype)
                ys, fin = self._direction(seq, init, k, sfx, reverse=d == 1)
                outs.append(ys)
                finals.append(fin)
            seq = outs[0] if len(outs) == 1 else F.concatenate(outs, axis=-1)
        return F.transpose(seq, (1, 0, 2)), self._pack(finals)

    def _pack(self, finals):
        return F.stack([f[0] for f in finals], axis=0)

    def _init_state(self, state, i, n, dtype):
        """Initial carry of layer-direction i: zeros, or the user's (layers * dirs, N, H) tensor."""
        H = self.hidden_size
        if state is None:
            return [F.broadcast_to(constant(0, dtype), (n, H)) for _ in range(self._n_state)]
        parts = state if isinstance(state, (tuple, list)) else (state,)
        if len(parts) != self._n_state:
            raise GraphcError(f"{self.kind}: state must be {self._n_state} tensor(s), got {len(parts)}")
        out = []
        for s in parts:
            s = as_tensor(s)
            want = (self.num_layers * self.num_directions, n, H)
            if s.ndim != 3 or not all(_sh.dims_equal(a, b) for a, b in zip(s.shape, want)):
                raise ShapeError(f"{self.kind}: initial state {s.label} has shape {_sh.fmt_shape(s.shape)}, "
                                 f"expected {_sh.fmt_shape(want)} (layers * directions, batch, hidden)")
            out.append(F.cast(s[i], dtype))
        return out

    _n_state = 1

    def _direction(self, seq, init, k, sfx, reverse):
        """One layer in one direction on time-major seq (T, N, C): (ys (T, N, H), final carries)."""
        p, dt = self.named_params, seq.dtype
        # transposes, casts and the bias sum do not depend on the step: scan hoists them out of the loop
        w = {"ih": F.cast(p[f"weight_ih_l{k}{sfx}"], dt).T, "hh": F.cast(p[f"weight_hh_l{k}{sfx}"], dt).T}
        if self.bias:
            w["b_ih"], w["b_hh"] = F.cast(p[f"bias_ih_l{k}{sfx}"], dt), F.cast(p[f"bias_hh_l{k}{sfx}"], dt)
            w["b"] = w["b_ih"] + w["b_hh"]

        def step(carry, xt):
            new = self._cell(carry, xt, w)
            return new, new[0]
        # the step is written as torch's cell, x_t @ W_ih included: the optimiser's scan_hoist pass
        # computes that product for every step at once before the loop (one (T*N, C) @ (C, G*H) GEMM),
        # and in the gradient's loop sums the weight gradients by one GEMM after it
        fin, ys = F.scan(step, init, seq, reverse=reverse)
        return ys, fin

    def _gates(self, carry_h, xt, w):
        """x W_ih^T + h W_hh^T + b_ih + b_hh: all G gates at once, (N, G*H)."""
        z = xt @ w["ih"] + carry_h @ w["hh"]
        return z + w["b"] if self.bias else z

    def _gate_inputs(self, carry_h, xt, w):
        """The G gates' pre-activations, one (N, H) tensor each, as sums of slices of the two products
        (and of the bias): the step's elementwise work is then one kernel reading the products, with no
        (N, G*H) sum written and read back in between."""
        gx, gh, H = xt @ w["ih"], carry_h @ w["hh"], self.hidden_size
        out = []
        for k in range(self.gates):
            z = gx[:, k * H:(k + 1) * H] + gh[:, k * H:(k + 1) * H]
            out.append(z + w["b"][k * H:(k + 1) * H] if self.bias else z)
        return out

    def _cell(self, carry, xt, w):
        raise NotImplementedError

    def extra_repr(self):
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional}")


class RNN(_Recurrent):
    """Elman RNN: h' = tanh(W_ih x + b_ih + W_hh h + b_hh) (nonlinearity='relu' for ReLU)."""

    kind = "RNN"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = False,
                 nonlinearity: str = "tanh", **kw):
        if nonlinearity not in ("tanh", "relu"):
            raise GraphcError(f"RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, bidirectional, **kw)

    def _cell(self, carry, xt, w):
        act = F.tanh if self.nonlinearity == "tanh" else F.relu
        return [act(self._gates(carry[0], xt, w))]


class LSTM(_Recurrent):
    """LSTM with torch's gates (i, f, g, o): c' = f*c + i*g, h' = o*tanh(c'); state (h, c)."""

    kind, gates, _n_state = "LSTM", 4, 2

    def _cell(self, carry, xt, w):
        h, c = carry
        zi, zf, zg, zo = self._gate_inputs(h, xt, w)
        i, f, g, o = F.sigmoid(zi), F.sigmoid(zf), F.tanh(zg), F.sigmoid(zo)
        c2 = f * c + i * g
        return [o * F.tanh(c2), c2]

    def _pack(self, finals):
        return F.stack([f[0] for f in finals], axis=0), F.stack([f[1] for f in finals], axis=0)


class GRU(_Recurrent):
    """GRU with torch's gates (r, z, n): n = tanh(W_in x + b_in + r*(W_hn h + b_hn)), h' = (1-z)*n + z*h."""

    kind, gates = "GRU", 3

    def _cell(self, carry, xt, w):
        h, H = carry[0], self.hidden_size
        gi, gh = xt @ w["ih"], h @ w["hh"]   # sliced per gate: the step's elementwise work is one kernel
        r, z = gi[:, :H] + gh[:, :H], gi[:, H:2 * H] + gh[:, H:2 * H]
        gi_n, gh_n = gi[:, 2 * H:], gh[:, 2 * H:]
        if self.bias:  # b_hn must stay inside r * (W_hn h + b_hn)
            r, z = r + w["b"][:H], z + w["b"][H:2 * H]
            gi_n, gh_n = gi_n + w["b_ih"][2 * H:], gh_n + w["b_hh"][2 * H:]
        r, z = F.sigmoid(r), F.sigmoid(z)
        n = F.tanh(gi_n + r * gh_n)
        return [(1 - z) * n + z * h]
