"""einsum and diagonal: compositions of transpose, reshape, basic slicing, matmul and sum.

`einsum(equation, *operands)` follows np.einsum: explicit (`"ij,jk->ik"`) and implicit (`"ij,jk"`:
the output is the broadcast (`...`) axes, then the letters used once, in alphabetical order) modes,
ellipses broadcasting like NumPy's, a letter repeated inside one operand taking that operand's
diagonal (`"ii->i"`, `"...ii->...i"`). Each operand first loses its diagonals and the letters no other
operand and not the output needs (summed); then the operands are contracted left to right, each pair as
one batched matmul: (batch, free of the left, contracted) @ (batch, contracted, free of the right), the
batch letters being those shared with the output or with an operand still to come. Gradients come
from the parts, and every backend runs it natively.
"""
from __future__ import annotations

from .. import dtypes as _dt
from .. import shapes as _sh
from ..errors import ShapeError
from .core import as_tensor, cast
from .linalg import matmul
from .reduce import sum as _sum
from .shape_ops import broadcast_to, getitem, reshape, transpose


def diagonal(x, offset: int = 0, axis1: int = 0, axis2: int = 1):
    """np.diagonal: the elements x[..., i, i + offset] of the two axes, which are removed; the diagonal
    becomes the last axis. Both axes must have static sizes."""
    x = as_tensor(x)
    a1, a2 = _sh.normalize_axis(axis1, x.ndim, "diagonal"), _sh.normalize_axis(axis2, x.ndim, "diagonal")
    if a1 == a2:
        raise ShapeError(f"diagonal: axis1 and axis2 are the same axis ({a1})")
    n, m = x.shape[a1], x.shape[a2]
    if not (isinstance(n, int) and isinstance(m, int)):
        raise ShapeError(f"diagonal: axes {a1} and {a2} need static sizes, got {n} and {m}")
    offset = int(offset)
    rest = [a for a in range(x.ndim) if a not in (a1, a2)]
    t = transpose(x, tuple(rest + [a1, a2]))
    lead = tuple(x.shape[a] for a in rest)
    count = max(0, min(n, m - offset) if offset >= 0 else min(n + offset, m))
    flat = reshape(t, lead + (n * m,))
    if count == 0:
        return flat[..., 0:0]
    start = offset if offset >= 0 else -offset * m
    # element (i, i + offset) of the (n, m) block is flat element start + i * (m + 1)
    return getitem(flat, (Ellipsis, slice(start, start + (count - 1) * (m + 1) + 1, m + 1)))


def _parse(equation: str, operands: list) -> tuple[list[str], str]:
    """The operands' letter strings (ellipses replaced by private letters, right-aligned as NumPy
    broadcasts them) and the output's."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(operands):
        raise ShapeError(f"einsum: {equation!r} names {len(terms)} operand(s), got {len(operands)}")
    for part in terms + ([rhs] if arrow else []):
        body = part.replace("...", "", 1)
        if not all(c.isalpha() for c in body):
            raise ShapeError(f"einsum: {equation!r}: subscripts must be letters and at most one '...' per term")
    ranks = []
    for term, t in zip(terms, operands):
        named = len(term.replace("...", ""))
        k = t.ndim - named if "..." in term else 0
        if k < 0 or ("..." not in term and named != t.ndim):
            raise ShapeError(f"einsum: term {term!r} has {named} subscripts for an operand of rank {t.ndim}")
        ranks.append(k)
    n_ell = max(ranks, default=0)
    ell = "".join(chr(0x100 + i) for i in range(n_ell))     # letters no equation can use
    specs = [term.replace("...", ell[n_ell - k:]) for term, k in zip(terms, ranks)]
    if arrow:
        out = rhs.replace("...", ell)
    else:
        named = "".join(t.replace("...", "") for t in terms)
        out = ell + "".join(sorted(c for c in set(named) if named.count(c) == 1))
    if len(set(out)) != len(out):
        raise ShapeError(f"einsum: {equation!r}: an output subscript appears twice")
    missing = sorted(set(out) - set("".join(specs)))
    if missing:
        raise ShapeError(f"einsum: {equation!r}: output subscript(s) {', '.join(missing)} appear in no operand")
    return specs, out


def _sizes(specs, operands, equation) -> dict:
    """Letter -> size (a size-1 axis broadcasts against another size, as in NumPy)."""
    sizes: dict = {}
    for spec, t in zip(specs, operands):
        for c, d in zip(spec, t.shape):
            have = sizes.get(c)
            if have is None or (isinstance(have, int) and have == 1):
                sizes[c] = d
            elif not (isinstance(d, int) and d == 1) and not _sh.dims_equal(have, d):
                raise ShapeError(f"einsum: {equation!r}: subscript {c!r} has sizes {have} and {d}")
    return sizes


def _diagonals(spec: str, t):
    """The operand with each repeated letter reduced to its diagonal (the letter kept once, last)."""
    while len(set(spec)) < len(spec):
        c = next(ch for ch in spec if spec.count(ch) > 1)
        p = spec.index(c)
        q = spec.index(c, p + 1)
        t = diagonal(t, 0, p, q)
        spec = "".join(ch for k, ch in enumerate(spec) if k not in (p, q)) + c
    return spec, t


def _sum_letters(spec: str, t, drop):
    axes = tuple(k for k, c in enumerate(spec) if c in drop)
    if not axes:
        return spec, t
    return "".join(c for c in spec if c not in drop), _sum(t, axes)


def _stretch(spec: str, t, letters, sizes):
    """Broadcast t's size-1 axes of `letters` to their full size (a contracted broadcast axis)."""
    shape = tuple(sizes[c] if c in letters else d for c, d in zip(spec, t.shape))
    return broadcast_to(t, shape)


def _contract(sa: str, a, sb: str, b, keep: set, sizes: dict):
    """One pairwise contraction as a batched matmul; returns (letters, tensor) of the result."""
    batch = [c for c in sa if c in sb and c in keep]
    summed = [c for c in sa if c in sb and c not in keep]
    fa = [c for c in sa if c not in sb]
    fb = [c for c in sb if c not in sa]
    a = _stretch(sa, a, summed, sizes)
    b = _stretch(sb, b, summed, sizes)
    a = transpose(a, tuple(sa.index(c) for c in batch + fa + summed))
    b = transpose(b, tuple(sb.index(c) for c in batch + summed + fb))
    nb = len(batch)
    fa_dims, fb_dims = tuple(a.shape[nb:nb + len(fa)]), tuple(b.shape[nb + len(summed):])
    k = _sh.size([sizes[c] for c in summed])
    a = reshape(a, tuple(a.shape[:nb]) + (_sh.size(fa_dims), k))
    b = reshape(b, tuple(b.shape[:nb]) + (k, _sh.size(fb_dims)))
    r = matmul(a, b)
    return "".join(batch + fa + fb), reshape(r, tuple(r.shape[:nb]) + fa_dims + fb_dims)


def einsum(equation: str, *operands):
    """np.einsum over symbolic tensors: `einsum("bij,bjk->bik", a, b)`, `einsum("ii", m)` (trace),
    `einsum("...ij->...ji", x)`. Operands are promoted to a common dtype first."""
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    operands = [as_tensor(t) for t in operands]
    if not operands:
        raise ShapeError("einsum needs at least one operand")
    dt = _dt.promote(*[t.dtype for t in operands])
    operands = [t if t.dtype == dt else cast(t, dt) for t in operands]
    specs, out = _parse(equation, operands)
    sizes = _sizes(specs, operands, equation)
    terms = [_diagonals(s, t) for s, t in zip(specs, operands)]
    # letters only one operand has and the output lacks: summed before any product
    for i, (s, t) in enumerate(terms):
        others = set(out).union(*[set(o) for j, (o, _) in enumerate(terms) if j != i])
        terms[i] = _sum_letters(s, t, set(s) - others)
    spec, acc = terms[0]
    for i in range(1, len(terms)):
        keep = set(out).union(*[set(o) for o, _ in terms[i + 1:]])
        spec, acc = _contract(spec, acc, terms[i][0], terms[i][1], keep, sizes)
    spec, acc = _sum_letters(spec, acc, set(spec) - set(out))
    acc = transpose(acc, tuple(spec.index(c) for c in out))
    shape = tuple(sizes[c] for c in out)
    return broadcast_to(acc, shape)
