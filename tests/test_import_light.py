"""What a new process pays before its first compile: `import graphc` leaves ml_dtypes (bfloat16; its
import took 0.9 s with NumPy 2.4) for the first bfloat16 dtype, and compiling a float32 graph imports
no networkx. A bfloat16 graph in such a process still computes as ml_dtypes rounds."""
from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, sys
import numpy as np
import graphc as gc
after_import = sorted(m for m in ("ml_dtypes", "networkx") if m in sys.modules)
x = gc.placeholder("x", (None, 5))
f = gc.function([x], gc.softmax(gc.exp(x) * 2.0, axis=1), backend="numpy")
f(np.ones((2, 5), np.float32))
after_compile = sorted(m for m in ("ml_dtypes", "networkx") if m in sys.modules)
b = gc.placeholder("b", (7,), "bfloat16")
loaded = "ml_dtypes" in sys.modules
a = np.linspace(-3, 3, 7).astype(np.float32)
outs = {be: np.asarray(gc.function([b], gc.exp(b) * 3.0, backend=be)(a.astype(gc.dtypes.bfloat16)), np.float32).tolist()
        for be in BACKENDS}
import ml_dtypes
bf = ml_dtypes.bfloat16
e = np.exp(a.astype(bf).astype(np.float32)).astype(bf).astype(np.float32)
want = (e * np.float32(3.0)).astype(bf).astype(np.float32).tolist()
print(json.dumps({"after_import": after_import, "after_compile": after_compile, "loaded": loaded,
                  "outs": outs, "want": want, "dtype": str(gc.dtypes.bfloat16)}))
"""


def test_import_and_first_compile_stay_light_and_bfloat16_loads_on_use():
    import graphc as gc
    backends = [b for b in ("numpy", "llvm") if b in gc.available_backends()]
    r = subprocess.run([sys.executable, "-c", SCRIPT.replace("BACKENDS", repr(backends))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["after_import"] == [] and res["after_compile"] == []
    assert res["loaded"] and res["dtype"] == "bfloat16"
    for be, out in res["outs"].items():
        assert out == res["want"], be
