"""cumsum as a CUDA kernel: one thread per row of the scanned axis (a row is an index tuple of the other
axes of the dense input, seen as (pre, n, post)), summing sequentially in the compute dtype (float for
float16/bfloat16, the integer type itself otherwise: sums wrap as NumPy's do), so the order of additions
is np.cumsum's. Rows are independent: a grid-stride loop over pre * post of them."""
from __future__ import annotations

from graphc import dtypes as _dt
from graphc.backends.schedule.views import product
from graphc.ops.cumulative import CumSum

from . import kernels as K
from .lower import Params, lowers
from .prelude import VALUE_TYPES, load, store


def source(name: str, comment: str, x: tuple, out: tuple, pre, n, post, exclusive: bool, reverse: bool) -> str:
    acc_t = VALUE_TYPES[_dt.compute_dtype(out[1])]
    j = f"({n} - 1 - j)" if reverse else "j"
    v = load(f"{x[0]}[k]", x[1])
    lines = [f"// {comment}", K.signature(name, [x], [out], K.THREADS) + " {",
             f"  const long long n_ax = {n}, n_post = {post};",
             K.grid_stride(f"(long long)({pre}) * n_post"),
             "    const long long base = (i / n_post) * n_ax * n_post + i % n_post;",
             f"    {acc_t} acc = 0;",
             "    for (long long j = 0; j < n_ax; ++j) {",
             f"      const long long k = base + {j} * n_post;",
             f"      const {acc_t} v_ = ({acc_t})({v});"]
    if exclusive:
        lines += [f"      {out[0]}[k] = {store('acc', out[1])};", "      acc += v_;"]
    else:
        lines += ["      acc += v_;", f"      {out[0]}[k] = {store('acc', out[1])};"]
    lines += ["    }", "  }", "}"]
    return "\n".join(lines) + "\n"


@lowers(CumSum)
def cumsum(s, node, ins) -> None:
    """A cumsum node on the cuda schedule `s`: the input made dense, one thread per row."""
    y = node.outputs[0]
    x = s.dense(ins[0])
    a = node.attrs
    axis = a["axis"]
    P = Params(s)
    xa = (P(x), x.dtype)
    out = s.fresh(y)
    oa = (P(out, write=True), y.dtype)
    pre, n, post = (s.c(product(x.shape[:axis])), s.c(x.shape[axis]), s.c(product(x.shape[axis + 1:])))
    rows = [d for k, d in enumerate(x.shape) if k != axis]
    comment = (f"cumsum along axis {axis} of {x.dtype}{list(x.shape)}"
               f"{' exclusive' if a['exclusive'] else ''}{' reverse' if a['reverse'] else ''}")
    s.launch("cumsum", lambda kn: source(kn, comment, xa, oa, pre, n, post, a["exclusive"], a["reverse"]), P,
             K.grid_1d(lambda ev: ev(product(rows))), (K.THREADS, 1, 1), False)
    s.view[id(y)] = out
