"""The README's benchmark table from a saved results file: `python -m benchmarks.readme_table
[benchmarks/results/<cpu>.json]` prints it as Markdown (median per call, the best sample in brackets, and
llvm / best peer), so the README shows the figures the file holds and nothing typed by hand."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .harness import best_peer

#: (results key, column title): the systems the README compares, in its order
COLUMNS = [("numpy", "NumPy by hand"), ("graphc-numpy O2", "graphc numpy O2"), ("graphc-llvm", "**graphc llvm**"),
           ("torch", "torch 2.13 eager"), ("onnxruntime", "ONNX Runtime"), ("jax", "JAX jit")]
TITLES = {"W1": "MLP", "W2": "elementwise 4M", "W3": "LeNet", "W4": "LSTM", "W5": "MLP train step",
          "W6": "matmul 1024^3", "W7": "encoder layer", "W8": "LeNet train step", "W9": "LSTM train step",
          "W10": "ResNet-18"}


def _num(s: float, unit: float) -> str:
    v = s / unit
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _cell(r: dict, bold: bool = False) -> str:
    if r.get("status") != "ok":
        return "-"
    med, lo = r["median"], r["min"]
    unit, name = (1e-6, "us") if med < 1e-3 else (1e-3, "ms") if med < 1 else (1.0, "s")
    text = f"{_num(med, unit)} {name} ({_num(lo, unit)})"
    return f"**{text}**" if bold else text


def _label(wl_id: str) -> str:
    head, _, rest = wl_id.partition(" ")
    title = TITLES.get(head, "")
    if head == "W10":
        title += f" {rest} (ONNX)" if rest else " (ONNX)"
    elif rest:
        title += f" {rest}"
    return f"{head} {title}".strip()


def markdown(results: dict) -> str:
    lines = ["| workload | " + " | ".join(t for _, t in COLUMNS) + " | llvm / best peer |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for wl_id, row in results.items():
        cells = [_cell(row.get(k, {}), bold=(k == "graphc-llvm")) for k, _ in COLUMNS]
        peer, m = best_peer(row)
        llvm = row.get("graphc-llvm", {})
        ratio = f"{llvm['median'] / m:.2f}x" if peer and llvm.get("status") == "ok" else "-"
        lines.append(f"| {_label(wl_id)} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        path = Path(argv[0])
    else:
        from .harness import cpu_slug, environment
        path = Path(__file__).parent / "results" / f"{cpu_slug(environment()['processor'])}.json"
    print(markdown(json.loads(path.read_text())["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
