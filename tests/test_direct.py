"""directpred.py and directcopy.py: the saved predictor is its formula applied to the saved F-hat,
F-hat averages the projections' outer products over the steps, the sgd baseline reports the
asymmetry of W_p, and --ema 0 trains against the online network itself."""
import math

import numpy as np
import pytest
import torch

import directcopy
import directpred
from conftest import TINY, load

BATCH, STEPS = 16, 3  # TINY's batch; 2 x 16 x 3 = 96 outer products stay below the rank 128 of F-hat


def run(script, out, *flags):
    script.main([*TINY, "--epochs", "1", "--max-steps", str(STEPS), "--out-dir", str(out), *flags])
    return load(out / "checkpoint.pt")


# The two formulas again, in float64 numpy, written apart from the scripts.
def directpred_formula(F_hat, eps):
    s, U = np.linalg.eigh(F_hat)
    p = np.maximum(np.sqrt(np.maximum(s, 0) / s.max()) + eps, 1e-4)
    return U @ np.diag(p) @ U.T


def directcopy_formula(F_hat, eps):
    return F_hat / np.linalg.norm(F_hat, 2) + eps * np.eye(len(F_hat))


@pytest.mark.parametrize("script, formula", [(directpred, directpred_formula), (directcopy, directcopy_formula)])
def test_saved_predictor_is_the_formula_of_the_saved_F(script, formula, tmp_path):
    checkpoint = run(script, tmp_path)
    F_hat = checkpoint["F"].double().numpy()
    W = checkpoint["model"]["predictor.weight"].double().numpy()
    assert np.array_equal(F_hat, checkpoint["model"]["F_hat"].double().numpy())

    # Every step adds the outer products of 2 x BATCH projections: F-hat is symmetric positive
    # semi-definite, and its rank counts the projections of all the steps, no more and no fewer.
    s = np.linalg.eigvalsh(F_hat)
    np.testing.assert_allclose(F_hat, F_hat.T, rtol=0, atol=1e-6 * s.max())
    assert s.min() > -1e-5 * s.max()
    assert (s > 1e-5 * s.max()).sum() == 2 * BATCH * STEPS

    np.testing.assert_allclose(W, formula(F_hat, checkpoint["args"]["eps"]), rtol=0, atol=1e-5)
    np.testing.assert_allclose(W, W.T, rtol=0, atol=1e-6)

    # The logged spectra: W_p has F-hat's eigenvectors, each with a positive eigenvalue (alignment 1).
    row = checkpoint["history"][-1]
    np.testing.assert_allclose(row["F_eigenvalues"], s[::-1], rtol=0, atol=1e-6 * s.max())
    np.testing.assert_allclose(row["predictor_eigenvalues"], np.linalg.eigvalsh(W)[::-1], rtol=0, atol=1e-5)
    np.testing.assert_allclose(row["alignment"], 1.0, rtol=0, atol=1e-5)
    assert row["asymmetry"] < 1e-6 and math.isfinite(row["loss"])


def test_sgd_predictor_is_trained_and_its_asymmetry_reported(tmp_path):
    checkpoint = run(directpred, tmp_path / "sgd", "--predictor", "sgd")
    W = checkpoint["model"]["predictor.weight"].double()
    torch.manual_seed(checkpoint["args"]["seed"])  # the script builds its model right after this seed
    initial = directpred.BYOL(512, 128, "sgd", False).predictor.weight.detach().double()
    assert (W - initial).abs().max() > 1e-4, "the sgd predictor did not move"
    asymmetry = checkpoint["history"][-1]["asymmetry"]
    assert asymmetry == pytest.approx(((W - W.T).norm() / (W + W.T).norm()).item(), rel=1e-6)
    assert asymmetry > 0.5  # a random matrix is far from symmetric

    symmetric = run(directpred, tmp_path / "symmetric", "--predictor", "sgd", "--symmetric")
    W = symmetric["model"]["predictor.weight"]
    assert (W - W.T).abs().max() > 1e-3  # the stored weight is not symmetric, the W_p applied is
    assert symmetric["history"][-1]["asymmetry"] == 0


def test_no_ema_makes_the_target_the_online_network(tmp_path):
    checkpoint = run(directcopy, tmp_path, "--ema", "0")
    state = checkpoint["model"]
    online = [name for name, _ in directcopy.BYOL(512, 128, "direct", False).named_parameters()
              if name.startswith(("backbone.", "projector."))]
    assert online and all(torch.equal(state[f"target_{name}"], state[name]) for name in online)
    assert math.isfinite(checkpoint["history"][-1]["loss"])
