"""A variational autoencoder on scikit-learn's digits: the encoder predicts (mu, log sigma^2) of an
8-d latent, z = mu + sigma * eps is sampled IN the graph (gc.random.normal, reparameterised so
gradients reach mu and sigma), and the decoder's Bernoulli logits reconstruct the pixels.
Loss: reconstruction cross-entropy + KL(q(z|x) || N(0, I)) per image.

    python examples/vae_digits.py [--epochs 40] [--png vae.png]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import graphc as gc  # noqa: E402
from digits_data import load_digits_split  # noqa: E402

LATENT = 8


class VAE(gc.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        nn = gc.nn
        self.enc = nn.Sequential(nn.Dense(64, 64, seed=seed), gc.relu, nn.Dense(64, 2 * LATENT, seed=seed + 1))
        self.dec = nn.Sequential(nn.Dense(LATENT, 64, seed=seed + 2), gc.relu, nn.Dense(64, 64, seed=seed + 3))
        self.rng = gc.random.Generator(seed, "vae.rng")

    def children(self):
        return [self.enc, self.dec]

    def terms(self, x, training: bool = True):
        """(reconstruction logits, mean reconstruction loss, mean KL)."""
        h = self.enc(x)
        mu, logvar = h[:, :LATENT], h[:, LATENT:]
        z = gc.random.normal(mu.shape, mu, gc.exp(0.5 * logvar), generator=self.rng) if training else mu
        logits = self.dec(z)
        rec = gc.mean(gc.sum(gc.softplus(logits) - logits * x, axis=1))   # Bernoulli NLL from logits
        kl = gc.mean(-0.5 * gc.sum(1 + logvar - mu * mu - gc.exp(logvar), axis=1))
        return logits, rec, kl


def main(epochs: int = 40, png: str | None = None, seed: int = 0, batch_size: int = 32):
    """Train; returns the per-epoch (reconstruction, KL) of the held-out digits."""
    xtr, _, xte, _ = load_digits_split(seed=seed)
    vae = VAE(seed)
    x = gc.placeholder("x", (None, 64))
    _, rec, kl = vae.terms(x, training=True)
    loss = rec + kl
    step = gc.function([x], [rec, kl], updates=gc.optim.Adam(2e-3).updates(loss, vae.params))
    _, rec_e, kl_e = vae.terms(x, training=False)
    evaluate = gc.function([x], [rec_e, kl_e])
    rng, hist, t0 = np.random.default_rng(seed), [], time.perf_counter()
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1):  # small matrices: one BLAS thread is fastest on a shared machine
        for epoch in range(epochs):
            order = rng.permutation(len(xtr))
            for i in range(0, len(order), batch_size):
                step(xtr[order[i:i + batch_size]])
            hist.append(tuple(float(v) for v in evaluate(xte)))
    print(f"VAE: held-out reconstruction NLL {hist[0][0]:.2f} -> {hist[-1][0]:.2f} nats/image, "
          f"KL {hist[-1][1]:.2f} ({time.perf_counter() - t0:.1f} s)")
    if png:
        save_png(vae, xte[:8], png)
    return hist


def save_png(vae, x, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = gc.placeholder("x", (None, 64))
    rec = gc.function([xs], gc.sigmoid(vae.terms(xs, training=False)[0]))(x)
    z = gc.placeholder("z", (None, LATENT))
    prior = np.random.default_rng(0).standard_normal((8, LATENT)).astype(np.float32)
    samples = gc.function([z], gc.sigmoid(vae.dec(z)))(prior)
    fig, ax = plt.subplots(3, 8, figsize=(8, 3.2))
    for i in range(8):
        for r, img in enumerate((x[i], rec[i], samples[i])):
            ax[r, i].imshow(img.reshape(8, 8), cmap="gray_r")
            ax[r, i].axis("off")
    fig.suptitle("digits, VAE reconstructions, samples from the prior", fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"saved {path}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--png")
    a = ap.parse_args()
    main(a.epochs, a.png)
