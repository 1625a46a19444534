"""The training step of every script, as GPU runs need it: no host sync inside it (checked on the CPU
by making every call that waits for a GPU raise), the direct predictors equal to their eigenvalue
formulas without an eigendecomposition, and a compiled step (--compile) equal to the eager one."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import byol
import dino_vit
import directcopy
import directpred
import simsiam
from conftest import TINY

SMALL = {
    byol: ["--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "64"],
    simsiam: ["--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "16"],
    directpred: ["--proj-hidden", "64", "--proj-dim", "32"],
    directcopy: ["--proj-hidden", "64", "--proj-dim", "32"],
    dino_vit: ["--dim", "32", "--depth", "2", "--heads", "2", "--mlp-dim", "64", "--head-hidden", "64",
               "--bottleneck-dim", "16", "--out-dim", "64", "--local-crops", "2"],
}
# What waits for the GPU on CUDA: reading a value on the host, host data sent to the device, and the
# linear algebra whose kernels check their result on the host.
SYNCING = [(torch.Tensor, name) for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")] + \
          [(torch, "tensor"), (torch.linalg, "eigh"), (torch.linalg, "eigvalsh"), (torch.linalg, "svd"),
           (torch.linalg, "svdvals"), (torch.linalg, "matrix_norm"), (torch.linalg, "inv")]


def set_up(script, *flags, compile_views=False):
    args = script.get_args([*TINY, *SMALL[script], *flags])
    compute = script.compute_settings("cpu", compile_views)
    data = script.prepare_data(args, compute.device)
    torch.manual_seed(args.seed)
    model = script.build_model(args)
    return args, compute, data, model, script.make_optimizer(model, args)


def run_steps(script, args, compute, data, model, optimizer, steps, first=0):
    losses = []
    for step in range(first, first + steps):
        torch.manual_seed(step)
        hyper = script.hyperparameters(step, 100, 4, args)
        images = data["train_x"][16 * step:16 * (step + 1)]
        losses.append(script.train_step(model, model, optimizer, images, hyper, args, data, compute)["loss"])
    return losses


@pytest.mark.parametrize("script, flags", [(byol, []), (simsiam, []), (directpred, []), (directcopy, []),
                                           (directpred, ["--predictor", "sgd", "--symmetric"]), (dino_vit, [])],
                         ids=["byol", "simsiam", "directpred", "directcopy", "directpred-sgd", "dino_vit"])
def test_training_steps_make_no_host_sync(script, flags, monkeypatch):
    setup = set_up(script, *flags)

    def syncs(*args, **kwargs):
        raise AssertionError("a host sync inside the training step")

    with monkeypatch.context() as patched:
        for owner, name in SYNCING:
            patched.setattr(owner, name, syncs)
        losses = run_steps(script, *setup, steps=2)
    assert all(torch.isfinite(loss) for loss in losses)


def directpred_formula(F_hat, eps):
    s, U = np.linalg.eigh(F_hat)
    return U @ np.diag(np.sqrt(np.maximum(s, 0) / s.max()) + eps) @ U.T


@pytest.mark.parametrize("spectrum", [
    np.logspace(0, -10, 128),                                 # a wide spectrum: collapsing directions
    np.r_[np.logspace(0, -3, 96), np.zeros(32)],              # rank deficient, as after few steps
    np.r_[1.0, 0.999, np.random.default_rng(0).uniform(0, 0.99, 126)],  # a top pair 0.1% apart
], ids=["wide", "rank-96", "close-top"])
def test_direct_predictors_equal_their_eigendecomposition_formulas(spectrum):
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.standard_normal((128, 128)))
    F_hat = (Q * (30 * spectrum)) @ Q.T
    start = torch.full((128,), 128 ** -0.5, dtype=torch.float64)
    W, vector = directpred.direct_predictor(torch.from_numpy(F_hat), 0.1, start)
    np.testing.assert_allclose(W.numpy(), directpred_formula(F_hat, 0.1), rtol=0, atol=1e-4)
    W, _ = directcopy.direct_predictor(torch.from_numpy(F_hat), 0.3, start)
    np.testing.assert_allclose(W.numpy(), F_hat / np.linalg.norm(F_hat, 2) + 0.3 * np.eye(128), rtol=0, atol=1e-4)
    assert abs(vector.numpy() @ Q[:, 0]) > 0.99  # close to the top eigenvector: the next warm start


class TinyBackbone(nn.Sequential):
    """A stand-in for ResNet-18 that torch.compile builds in seconds on a CPU: 512-d features."""

    def __init__(self):
        super().__init__(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 512))


def test_a_compiled_step_gives_the_eager_loss_and_compiles_once(monkeypatch):
    monkeypatch.setattr(byol, "resnet18_backbone", lambda cifar_stem: TinyBackbone())
    eager = run_steps(byol, *set_up(byol), steps=3)
    torch._dynamo.reset()
    args, compute, data, model, optimizer = set_up(byol, compile_views=True)
    model.compile(dynamic=False)
    compiled = run_steps(byol, args, compute, data, model, optimizer, steps=1)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled += run_steps(byol, args, compute, data, model, optimizer, steps=2, first=1)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs > 0  # no recompile after step 1
    torch.testing.assert_close(torch.stack(compiled), torch.stack(eager), rtol=1e-4, atol=1e-5)
