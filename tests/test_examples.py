"""The examples under examples/ in shortened runs: each must clearly beat chance (the full runs,
e.g. `python examples/cnn_digits.py`, print >= 97% held-out accuracy)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="scikit-learn provides the digits data set")
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
sys.path.insert(0, EXAMPLES)


def test_mlp_digits_learns():
    import mlp_digits
    assert mlp_digits.main(epochs=3, progress=False) > 0.8     # chance: 0.1


def test_cnn_digits_learns():
    import cnn_digits
    _, acc, hist = cnn_digits.main(epochs=2, progress=False, n_train=600)
    assert acc > 0.7 and hist["loss"][-1] < hist["loss"][0]


def test_autoencoder_beats_the_mean_image(tmp_path):
    pytest.importorskip("matplotlib", reason="the PNG needs matplotlib")
    import autoencoder_digits
    mse, baseline = autoencoder_digits.main(epochs=5, png=str(tmp_path / "ae.png"), progress=False)
    assert mse < 0.7 * baseline and (tmp_path / "ae.png").stat().st_size > 1000


def test_vae_reconstruction_improves():
    import vae_digits
    hist = vae_digits.main(epochs=4)
    assert hist[-1][0] < 0.85 * hist[0][0] and all(np.isfinite(h).all() for h in hist)


def test_fgsm_drops_and_adversarial_training_recovers():
    import fgsm_digits
    out = fgsm_digits.main(eps=0.25, epochs=3, n_train=700)
    clean_acc, clean_adv = out["clean"]
    _, robust_adv = out["adversarial"]
    assert clean_acc > 0.8 and clean_adv < clean_acc - 0.3     # the attack works
    assert robust_adv > clean_adv + 0.1                         # adversarial training helps


def test_visualisation_saves_pngs(tmp_path):
    pytest.importorskip("matplotlib", reason="the PNGs need matplotlib")
    import visualize_cnn
    paths = visualize_cnn.main(str(tmp_path), epochs=1)
    assert len(paths) == 3 and all(os.path.getsize(p) > 1000 for p in paths)


def test_demo_script_runs():
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, "demo.py"), "--epochs", "4"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    acc = float(r.stdout.split("test accuracy:")[1].split()[0])
    assert acc > 0.85
    assert "gc.dprint" in r.stdout and "[id A]" in r.stdout    # the graph summary
    assert "epoch 4/4" in r.stderr                             # the progress bar
