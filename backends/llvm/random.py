"""random_uniform / random_normal as native kernels: graphc.ops.random's counter-based generator
(splitmix64 finaliser rounds over (seed, counter, stream word, element index)) spelled in LLVM IR with
the same uint64 arithmetic as the NumPy reference, so uniform draws are bit-exact and normal draws
differ only by libm's log/cos (a few ulp). The key is read through kernels.load (bounds-checked under
sanitize="bounds"); the per-draw state is computed once per kernel call (per thread chunk)."""
from __future__ import annotations

from graphc.errors import GraphcError
from graphc.ops import random as R

from . import kernels as K
from .irtext import Emitter, fconst
from .lower import convert
from .table import lowers
from ..schedule.views import View


def _i64(c: int) -> str:
    """An unsigned 64-bit constant as LLVM's (signed) i64 literal."""
    c &= R.MASK
    return str(c - (1 << 64) if c >= 1 << 63 else c)


def mix(em: Emitter, z: str) -> str:
    """splitmix64's finaliser (graphc.ops.random.mix)."""
    for shift, mul in ((30, R.MIX1), (27, R.MIX2)):
        z = em(f"xor i64 {z}, {em(f'lshr i64 {z}, {shift}')}")
        z = em(f"mul i64 {z}, {_i64(mul)}")
    return em(f"xor i64 {z}, {em(f'lshr i64 {z}, 31')}")


def base_key(em: Emitter, P, key: View, word: int) -> str:
    """The per-draw state from key [seed, counter] (graphc.ops.random.base_key)."""
    seed = K.load(em, P, key, key.offset)
    counter = K.load(em, P, key, key.offset + key.strides[0])
    h = mix(em, em(f"xor i64 {seed}, {_i64(R.SEED_SALT)}"))
    h = mix(em, em(f"xor i64 {em(f'xor i64 {h}, {counter}')}, {_i64(R.COUNTER_SALT)}"))
    return mix(em, em(f"xor i64 {h}, {_i64(word ^ R.WORD_SALT)}"))


def _bits(em: Emitter, base: str, j: str) -> str:
    """mix(base + (j + 1) * GAMMA) (graphc.ops.random.bits)."""
    step = em(f"mul i64 {em(f'add i64 {j}, 1')}, {_i64(R.GAMMA)}")
    return mix(em, em(f"add i64 {base}, {step}"))


def _unit_f64(em: Emitter, x: str, plus_one: bool = False) -> str:
    """(x >> 11 (+ 1)) * 2**-53 as a double: exact."""
    m = em(f"lshr i64 {x}, 11")
    if plus_one:
        m = em(f"add i64 {m}, 1")
    return em(f"fmul double {em(f'uitofp i64 {m} to double')}, {fconst(2.0 ** -53, 'float64')}")


def uniform(em: Emitter, base: str, j: str, dtype: str) -> str:
    """(bits(j) >> (64 - p)) * 2**-p, p = the dtype's significand bits (exact; float16/bfloat16 in float)."""
    x = _bits(em, base, j)
    p = R.UNIFORM_BITS[dtype]
    if p <= 24:
        f = em(f"uitofp i64 {em(f'lshr i64 {x}, {64 - p}')} to float")
        return em(f"fmul float {f}, {fconst(2.0 ** -p, 'float32')}")
    return _unit_f64(em, x)


def normal(em: Emitter, base: str, j: str, dtype: str) -> str:
    """Box-Muller in double from bits(2j) and bits(2j + 1), rounded to dtype."""
    j2 = em(f"shl i64 {j}, 1")
    u1 = _unit_f64(em, _bits(em, base, j2), plus_one=True)
    u2 = _unit_f64(em, _bits(em, base, em(f"or i64 {j2}, 1")))
    lg = em(f"call double @log(double {u1})")
    r = em(f"call double @llvm.sqrt.f64(double {em(f'fmul double -2.0, {lg}')})")
    theta = em(f"fmul double {fconst(R.TWO_PI, 'float64')}, {u2}")
    c = em(f"call double @cos(double {theta})")
    z = em(f"fmul double {r}, {c}")
    return convert(em, z, "float64", dtype)   # one rounding to the dtype (float16/bfloat16 included)


#: op -> the element function of its distribution
DRAWS = {R.RandomUniform: uniform, R.RandomNormal: normal}


def draw(op, out: View, key: View, stream: int) -> K.Kernel:
    """out (contiguous, row-major) = the draw of `op` from `key` and `stream`; element j of out is
    element j of the flat draw, so a batch of N rows is the first N rows of any larger batch."""
    if not out.contiguous and out.size > 1:
        raise GraphcError(f"internal error (a graphc bug, please report it): llvm {op.name} planned into a "
                          f"non-contiguous view {out}")   # plan() always gives it a fresh buffer
    element, word, size = DRAWS[op], op.word(stream), out.size

    def emit(em, P, lo, hi):
        if size == 0:
            return
        base = base_key(em, P, key, word)

        def body(j):
            K.store(em, P, out, em(f"add i64 {j}, {out.offset}"), element(em, base, j, out.dtype))
        em.loop(hi, body, start=lo)
    split = size if size >= K.PARALLEL_MIN else None
    return K.Kernel(op.name, [out, key], emit, split, size, size)


@lowers(R.RandomUniform, R.RandomNormal)
def plan(p, node, ins) -> None:
    """The llvm table's row: a fresh output buffer on planner `p` and the draw kernel."""
    t = node.outputs[0]
    out = p.fresh(t)
    p.add(draw(node.op, out, ins[0], node.attrs["stream"]), ins, [out])
    p.view[id(t)] = out
