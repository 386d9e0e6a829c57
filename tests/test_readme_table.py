"""benchmarks/readme_table.py: the README's benchmark table generated from a saved results file; and the
README's current table (the first one) is exactly the table of the results file it names before it."""
from __future__ import annotations

import json
import re
from pathlib import Path

from benchmarks.readme_table import markdown

ROOT = Path(__file__).resolve().parent.parent


def test_rows_show_median_best_and_the_ratio_to_the_best_peer():
    ok = lambda med, lo: {"status": "ok", "median": med, "min": lo}   # noqa: E731
    results = {
        "W1 b1": {"numpy": ok(110e-6, 109e-6), "graphc-llvm": ok(64.1e-6, 62.8e-6), "onnxruntime": ok(98.4e-6, 94.3e-6),
                  "jax": {"status": "not written for JAX"}},
        "W6": {"numpy": ok(0.0355, 0.0319), "graphc-llvm": ok(0.0331, 0.0305), "torch": ok(0.0326, 0.0319)},
        "W10 b8": {"graphc-llvm": ok(0.294, 0.288), "onnxruntime": ok(0.414, 0.408)},
        "W2": {"graphc-llvm": ok(1.5, 1.25), "jax": ok(2.0, 1.9)},
    }
    lines = markdown(results).splitlines()
    assert lines[0].startswith("| workload | NumPy by hand | graphc numpy O2 | **graphc llvm** |")
    assert lines[2] == "| W1 MLP b1 | 110 us (109) | - | **64.1 us (62.8)** | - | 98.4 us (94.3) | - | 0.65x |"
    assert lines[3] == "| W6 matmul 1024^3 | 35.5 ms (31.9) | - | **33.1 ms (30.5)** | 32.6 ms (31.9) | - | - | 1.02x |"
    assert lines[4] == "| W10 ResNet-18 b8 (ONNX) | - | - | **294 ms (288)** | - | 414 ms (408) | - | 0.71x |"
    assert lines[5] == "| W2 elementwise 4M | - | - | **1.5 s (1.25)** | - | - | 2 s (1.9) | 0.75x |"


def test_the_readme_table_is_the_saved_results_file():
    text = (ROOT / "README.md").read_text()
    first = text.index("\n| workload |")
    names = re.findall(r"benchmarks/results/([\w.-]+)\.json", text[:first])
    assert names, "the README names no results file before its benchmark table"
    results = json.loads((ROOT / "benchmarks" / "results" / f"{names[-1]}.json").read_text())["results"]
    table = text[first + 1:].split("\n\n", 1)[0].strip()
    assert table == markdown(results), ("README's table differs from `python -m benchmarks.readme_table "
                                        f"benchmarks/results/{names[-1]}.json`")
