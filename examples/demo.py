"""graphc's main demo: train a digits classifier (scikit-learn's 8x8 digits, offline) with a progress
bar, print the held-out accuracy, and summarise the compiled training graph with gc.dprint.

    python examples/demo.py            # the MLP (a few seconds)
    python examples/demo.py --cnn      # the CNN (conv-BN-ReLU x2, max-pool, dense)
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import graphc as gc  # noqa: E402
import cnn_digits  # noqa: E402
import mlp_digits  # noqa: E402
from digits_data import load_digits_split  # noqa: E402


def main(cnn: bool = False, epochs: int | None = None, backend: str = "numpy", depth: int = 4) -> float:
    ex = cnn_digits if cnn else mlp_digits
    xtr, ytr, xte, yte = load_digits_split(images=cnn)
    model = ex.build(0)
    print(model)
    epochs = epochs or (10 if cnn else 40)
    hist = gc.fit(model, gc.losses.cross_entropy, ex.make_optimizer(epochs, len(xtr)), xtr, ytr, epochs=epochs,
                  batch_size=32, validation_data=(xte, yte), backend=backend, blas_threads=1)
    acc = hist["val_accuracy"][-1]
    print(f"\ntest accuracy: {acc:.4f}  ({len(xte)} held-out digits, {hist.seconds:.1f} s of training)")
    f = hist.train_fn
    ops = Counter(f.graph.op_names())
    print(f"\ntraining step: {len(f.graph.compute_nodes())} ops after optimisation "
          f"({len(f.user_graph.compute_nodes())} before), {len(f.graph.updates)} updates; most common: "
          + ", ".join(f"{k} x{v}" for k, v in ops.most_common(6)))
    print(f"the loss, summarised by gc.dprint (depth {depth}):")
    gc.dprint(f.graph.outputs[0], depth=depth)
    _picture(f, "cnn" if cnn else "mlp")
    return acc


def _picture(f, name: str) -> None:
    """Write the optimised training graph as SVG (or as DOT text where Graphviz is not installed)."""
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}_training_graph.svg")
    try:
        gc.draw(f, path)
    except gc.viz.GraphvizNotFound:
        path = path[:-4] + ".dot"
        gc.draw(f, path)
        print("(Graphviz's `dot` is not installed, so the picture is DOT text: apt-get install graphviz)")
    print(f"\nthe optimised training graph (fused kernels as clusters) is drawn in {path}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cnn", action="store_true")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--backend", default="numpy")
    ap.add_argument("--depth", type=int, default=4)
    a = ap.parse_args()
    main(a.cnn, a.epochs, a.backend, a.depth)
