"""Each method as its paper has it: losses, update rules, predictors, ablations and collapse measures against
their formulas; a training step that never waits for the GPU; a compiled step equal to the eager one."""
import argparse
import copy
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import byol
import dino_vit
import directcopy
import directpred
import simsiam
from conftest import SMALL, TINY

def set_up(script, *flags):
    args = script.parse_args([*TINY, *SMALL[script.SCRIPT], *flags])[0]
    ctx = script.setup(args)
    data = script.load_data(args, ctx.device)
    torch.manual_seed(0)
    model = script.build_model(args)
    return args, ctx, data, model, script.make_optimizer(model, args)

def steps(script, args, ctx, data, model, optimizer, count, first=0):
    losses = []
    for step in range(first, first + count):
        torch.manual_seed(step)
        images = data["train_x"][16 * step:16 * (step + 1)]
        hyper = script.schedules(step, 4, args)
        losses.append(script.train_step(model, model, optimizer, images, hyper, args, ctx)["loss"])
    return losses

# --- BYOL ---------------------------------------------------------------------------------------------
def test_byol_loss_is_the_symmetrised_regression_and_the_target_the_ema_of_the_online_network():
    torch.manual_seed(0)
    model = byol.BYOL(16, 64, 32, 64)
    view1, view2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    loss, z1 = model(view1, view2)
    online = [model.predictor(model.projector(model.backbone(v))) for v in (view1, view2)]
    target = [model.target(v) for v in (view1, view2)]
    mse = [(F.normalize(p, dim=1) - F.normalize(t, dim=1)).square().sum(dim=1).mean()
           for p, t in zip(online, target[::-1])]
    torch.testing.assert_close(loss, mse[0] + mse[1])  # 2 - 2 cos is the squared distance of unit vectors
    with torch.no_grad():
        for param in model.projector.parameters():
            param.add_(torch.randn_like(param))
    before = [param.clone() for param in model.target[1].parameters()]
    model.update_target(0.9)
    for old, new, online in zip(before, model.target[1].parameters(), model.projector.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online)
    assert not any(param.requires_grad for param in model.target.parameters())

# --- The monitors and the schedule that every script shares -----------------------------------------
def test_knn_votes_with_exp_similarity_over_temperature():
    """One near neighbour of class 0 outweighs two farther ones of class 1 at t = 0.1, not at t = 1."""
    bank, labels = torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0]]), torch.tensor([0, 1, 1])
    query, truth = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert byol.knn_top1(bank, labels, query, truth, k=3) == 1.0
    assert byol.knn_top1(bank, labels, query, truth, k=3, temperature=1.0) == 0.0

def test_effective_rank_is_the_exp_entropy_of_the_singular_values():
    z = torch.tensor([[3.0, 0.0]] * 4 + [[0.0, 2.0]])  # singular values 2 and 1 once normalised
    p = torch.tensor([2 / 3, 1 / 3])
    assert byol.effective_rank(z) == pytest.approx(torch.exp(-(p * p.log()).sum()).item())

def test_the_schedule_warms_up_linearly_then_follows_a_half_cosine():
    values = [byol.cosine(step, 10, 1.0, 0.0, warmup_steps=2) for step in (0, 1, 2, 6, 10)]
    assert values == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])

# --- SimSiam ------------------------------------------------------------------------------------------
def test_simsiam_stop_gradient_halves_the_gradient_of_a_predictorless_siamese_network():
    """Sec. 4.2: with the identity as predictor the stop-gradient loss has exactly half the gradient of
    -cos(z1, z2) through both branches, so it collapses alike; the loss is the symmetrised negative cosine."""
    torch.manual_seed(0)
    model = simsiam.SimSiam(16, 64, 32, 16, predictor="identity")
    views = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    gradients = {}
    for stop_grad in (True, False):
        model.stop_grad = stop_grad
        model.zero_grad()
        loss, z1, before_bn1 = model(*views)
        loss.backward()
        gradients[stop_grad] = [param.grad.clone() for param in model.parameters()]
    z2 = model.projector(model.backbone(views[1]))
    torch.testing.assert_close(loss, -F.cosine_similarity(z1, z2).mean())
    torch.testing.assert_close(z1, model.projector[-1](before_bn1))  # in front of the output batch norm
    for half, full in zip(gradients[True], gradients[False]):
        torch.testing.assert_close(half, full / 2, atol=1e-6, rtol=1e-4)
    model = simsiam.SimSiam(16, 64, 32, 16)  # with its predictor: -cos(p1, z2) / 2 - cos(p2, z1) / 2 (Eq. 2)
    loss, z1, _ = model(*views)
    z2 = model.projector(model.backbone(views[1]))
    cosines = F.cosine_similarity(model.predictor(z1), z2) + F.cosine_similarity(model.predictor(z2), z1)
    torch.testing.assert_close(loss, -cosines.mean() / 2)

def test_simsiam_ablations_and_the_predictors_fixed_learning_rate():
    args, ctx, data, model, optimizer = set_up(simsiam)
    assert [layer.out_features for layer in model.predictor if isinstance(layer, nn.Linear)] == [16, 32]
    assert isinstance(model.projector[-1], nn.BatchNorm1d) and not model.projector[-1].affine
    steps(simsiam, args, ctx, data, model, optimizer, 2)
    encoder, predictor = optimizer.param_groups
    assert encoder["lr"] < predictor["lr"] == 0.03 * 16 / 256 and len(predictor["params"]) == 5
    for flag, predictor_type in [("--no-predictor", nn.Identity), ("--fixed-predictor", nn.Sequential)]:
        _, _, _, model, optimizer = set_up(simsiam, flag)
        assert isinstance(model.predictor, predictor_type) and optimizer.param_groups[1]["params"] == []
    with pytest.raises(SystemExit):
        simsiam.parse_args(["--no-predictor", "--fixed-predictor"])

def test_simsiam_collapse_measures_see_the_collapse_the_output_batch_norm_hides():
    """Behind the affine-free output batch norm every channel has unit variance: one point jittered by 1e-3
    reads healthy there, and outputs on one line read sqrt(1 - m^2) (m their mean sign). In front of the batch
    norm the collapse metric reads the point, and the share of variance off the main axis reads the line."""
    torch.manual_seed(0)
    output_bn = simsiam.SimSiam(16, 64, 256, 16).projector[-1]
    point = torch.randn(1, 256) + 1e-3 * torch.randn(512, 256)
    assert simsiam.collapse_metric(point) < 0.01 and simsiam.collapse_metric(output_bn(point)) > 0.95
    direction = (0.5 + torch.rand(256)) * torch.randn(256).sign()
    scale = torch.cat([-torch.ones(461), torch.full((51,), 461 / 51)])  # on one line through 0, mean sign m
    line = output_bn(scale[:, None] * direction)
    assert simsiam.collapse_metric(line).item() == pytest.approx(math.sqrt(1 - (410 / 512) ** 2), rel=1e-3)
    assert simsiam.off_axis_share(line) < 1e-4
    spread = F.normalize(output_bn(torch.randn(512, 256) @ torch.randn(256, 256)), dim=1)
    eigenvalues = torch.linalg.eigvalsh(torch.cov(spread.T, correction=0).double())
    assert simsiam.off_axis_share(spread).item() == pytest.approx(1 - eigenvalues[-1] / eigenvalues.sum(),
                                                                  abs=0.01)

# --- DirectPred and DirectCopy ------------------------------------------------------------------------
@pytest.mark.parametrize("spectrum", [np.logspace(0, -10, 128), np.r_[np.logspace(0, -3, 96), np.zeros(32)],
                                      np.r_[1.0, 0.999, np.random.default_rng(0).uniform(0, 0.99, 126)],
                                      np.r_[1.0, np.full(127, 1 - 3 / 65536)]],  # the solver's worst case
                         ids=["wide", "rank-96", "close-top", "crowded-top"])
def test_direct_predictors_equal_their_eigendecomposition_formulas(spectrum):
    """Without an eigendecomposition (it waits for the GPU): Tian et al. Eq. 18 and Wang et al.'s copy."""
    Q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((128, 128)))
    F_hat = (Q * (30 * spectrum)) @ Q.T
    s, U = np.linalg.eigh(F_hat)
    W = directpred.direct_predictor(torch.from_numpy(F_hat), 0.1)
    np.testing.assert_allclose(W, U @ np.diag(np.sqrt(np.maximum(s, 0) / s.max()) + 0.1) @ U.T, atol=1e-4)
    W = directcopy.direct_predictor(torch.from_numpy(F_hat), 0.3)
    np.testing.assert_allclose(W, F_hat / np.linalg.norm(F_hat) + 0.3 * np.eye(128), atol=1e-12)

def test_directpred_keeps_F_hat_as_the_running_correlation_and_sets_W_p_from_it():
    args, ctx, data, model, optimizer = set_up(directpred)
    correlations = []
    original = model.update_predictor

    def recording(z1, z2, rho, set_predictor, eps):
        z = torch.cat([z1, z2]).double()
        correlations.append((z.T @ z / len(z), rho))
        return original(z1, z2, rho, set_predictor, eps)

    model.update_predictor = recording
    steps(directpred, args, ctx, data, model, optimizer, 3)
    expected = torch.zeros(32, 32, dtype=torch.float64)
    for correlation, rho in correlations:
        expected = rho * expected + (1 - rho) * correlation
    torch.testing.assert_close(model.F_hat, expected)
    assert [rho for _, rho in correlations] == [0.0, 0.3, 0.3]  # the first batch starts F-hat (Eq. 19)
    statistics = directpred.predictor_statistics(model.F_hat, model.predictor_matrix())
    assert statistics["asymmetry"] < 1e-6 and min(statistics["alignment"]) > 0.999
    s, U = torch.linalg.eigh(model.F_hat)  # W_p is Eq. 18 of the F-hat it holds now
    eq18 = U @ torch.diag((s.clamp(min=0) / s.max()).sqrt() + args.eps) @ U.T
    torch.testing.assert_close(model.predictor.weight.double(), eq18, atol=1e-4, rtol=0)
    _, _, _, sgd, _ = set_up(directpred, "--predictor", "sgd", "--symmetric")
    assert sgd.predictor.weight.requires_grad
    assert torch.allclose(sgd.predictor_matrix(), sgd.predictor_matrix().T)

# --- DINO ---------------------------------------------------------------------------------------------
def test_dino_loss_is_the_cross_entropy_of_every_teacher_crop_with_every_other_student_crop():
    torch.manual_seed(0)
    student, teacher, center = torch.randn(5, 3, 7), torch.randn(2, 3, 7), torch.randn(7)
    loss, entropy, center_kl = dino_vit.dino_loss(student, teacher, center, 0.04, 0.1)
    pairs = [(t, v) for t in range(2) for v in range(5) if v != t]
    p = F.softmax((teacher - center) / 0.04, dim=-1)
    expected = sum(-(p[t] * F.log_softmax(student[v] / 0.1, dim=-1)).sum(dim=-1).mean() for t, v in pairs)
    torch.testing.assert_close(loss, expected / len(pairs))
    with torch.autocast("cpu", torch.bfloat16):  # as on CUDA: the loss stays in float32
        torch.testing.assert_close(dino_vit.dino_loss(student, teacher, center, 0.04, 0.1)[0], loss)
    torch.testing.assert_close(entropy, -(p * p.log()).sum(dim=-1).mean())
    p = p.flatten(0, 1)
    kl = F.kl_div(p.mean(dim=0).log().expand_as(p), p, reduction="batchmean")
    torch.testing.assert_close(center_kl, kl)

def test_dino_centring_flattens_and_sharpening_peaks_a_teacher_that_ignores_its_input():
    """A teacher giving every image the same scores: centred, its distribution is uniform (entropy log K);
    uncentred and sharp, one prototype takes the mass. Either way KL(teacher || centre) is 0, and high for a
    teacher that sends the images to different prototypes."""
    scores = F.normalize(torch.randn(64, 16), dim=1) @ F.normalize(torch.randn(16), dim=0)
    teacher, student = scores.expand(2, 8, 64), torch.randn(4, 8, 64)
    _, centred, centred_kl = dino_vit.dino_loss(student, teacher, scores, 0.04, 0.1)
    _, sharp, sharp_kl = dino_vit.dino_loss(student, teacher, torch.zeros(64), 0.04, 0.1)
    assert centred.item() == pytest.approx(math.log(64), abs=1e-5) and sharp < math.log(64) - 2
    assert abs(centred_kl) < 1e-5 and abs(sharp_kl) < 1e-5
    diverse = (2 * torch.eye(64)[:16] - 1).expand(2, 16, 64)
    assert dino_vit.dino_loss(student.repeat(1, 2, 1), diverse, torch.zeros(64), 0.04, 0.1)[2].item() == \
        pytest.approx(math.log(16), abs=1e-3)

def test_dino_teacher_starts_as_the_student_and_its_prototype_scores_are_float32_cosines():
    args, ctx, data, model, optimizer = set_up(dino_vit)
    for (name, student), teacher in zip(model.backbone.state_dict().items(),
                                        model.teacher_backbone.state_dict().values()):
        assert torch.equal(student, teacher), name
    assert model.backbone.drop_path_rates[-1] == pytest.approx(0.1)
    assert set(model.teacher_backbone.drop_path_rates) == {0}
    with torch.autocast("cpu", torch.bfloat16):
        scores, bottleneck = model.head(torch.randn(8, 32))
    assert scores.dtype == torch.float32 and bottleneck.dtype == torch.bfloat16
    weight = model.head.last_layer.weight
    torch.testing.assert_close(scores, F.normalize(bottleneck.float(), dim=1) @ weight.T)
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(64))
    prototypes = model.head.last_layer.parametrizations.weight.original1.clone()
    steps(dino_vit, args, ctx, data, model, optimizer, 2)  # the first epoch: the prototypes stay fixed
    assert torch.equal(prototypes, model.head.last_layer.parametrizations.weight.original1)
    assert model.center.abs().sum() > 0
    teacher = [*model.teacher_backbone.parameters(), *model.teacher_head.parameters()]
    before = [param.add_(torch.randn_like(param)).clone() for param in teacher]  # far from the student
    hyper = dino_vit.schedules(4, 4, args)  # the second epoch: the prototypes learn, the teacher is the EMA
    dino_vit.train_step(model, model, optimizer, data["train_x"][:16], hyper, args, ctx)
    assert not torch.equal(prototypes, model.head.last_layer.parametrizations.weight.original1)
    for old, new, student in zip(before, teacher, [*model.backbone.parameters(), *model.head.parameters()]):
        torch.testing.assert_close(new, hyper["ema"] * old + (1 - hyper["ema"]) * student)

def test_dino_attention_maps_are_the_cls_tokens_weights_in_the_last_block():
    """With the [CLS] token's weight on itself, the maps rebuild the [CLS] output of the last block's
    attention, head by head: they are the weights it uses, at the patches, in image layout."""
    torch.manual_seed(0)
    vit = dino_vit.ViT(img_size=16, patch_size=4, dim=32, depth=2, heads=2, mlp_dim=64).eval()
    block, inputs = vit.blocks[-1], []
    block["attn_norm"].register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    maps = vit(torch.randn(3, 3, 16, 16), attention_maps=True)
    assert maps.shape == (3, 2, 4, 4) and (maps > 0).all()
    q, k, v = block["qkv"](block["attn_norm"](inputs[0])).view(3, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    weights = torch.cat([1 - maps.flatten(2).sum(-1, keepdim=True), maps.flatten(2)], dim=-1)
    attended = F.scaled_dot_product_attention(q, k, v)[:, :, 0]
    torch.testing.assert_close(torch.einsum("bht,bhtd->bhd", weights, v), attended)

@pytest.mark.parametrize("dtype, expected", [(None, torch.float32), ("bfloat16", torch.bfloat16)])
def test_dtype_sets_the_autocast_precision_and_the_cpu_default_is_float32(dtype, expected):
    ctx = byol.setup(argparse.Namespace(device="cpu", compile=False, dtype=dtype))
    with ctx.autocast:
        assert nn.Linear(4, 4)(torch.ones(2, 4)).dtype == expected

# --- every script's step ------------------------------------------------------------------------------
# What waits for the GPU: reading a value on the host, host data sent to the device, and linear algebra whose
# kernels check their result on the host.
READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")
SYNCING = [*((torch.Tensor, name) for name in READS), (torch, "tensor"), (torch.linalg, "eigh"),
           (torch.linalg, "eigvalsh"), (torch.linalg, "svdvals")]

@pytest.mark.parametrize("script, flags", [(byol, []), (simsiam, []), (directpred, []), (directcopy, []),
                                           (directpred, ["--predictor", "sgd", "--symmetric"]),
                                           (dino_vit, [])],
                         ids=["byol", "simsiam", "directpred", "directcopy", "directpred-sgd", "dino_vit"])
def test_a_training_step_never_waits_for_the_host(script, flags, monkeypatch):
    setup = set_up(script, *flags)

    def syncs(*args, **kwargs):
        raise AssertionError("a host sync inside the training step")

    with monkeypatch.context() as patched:
        for owner, name in SYNCING:
            patched.setattr(owner, name, syncs)
        losses = steps(script, *setup, 2)
    assert all(loss.isfinite() for loss in losses)

def test_a_compiled_step_gives_the_eager_loss_and_compiles_once(monkeypatch):
    """--compile: the model and the views' pixel work (a stand-in for ResNet-18), captured whole and once. The
    aot_eager backend traces as the default does, but skips inductor's C++ build (25 s on 2 cold cores)."""
    tiny = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 512))
    monkeypatch.setattr(byol, "resnet18", lambda img_size: copy.deepcopy(tiny))
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager = steps(byol, *set_up(byol), 3)
    torch._dynamo.reset()
    args, ctx, data, model, optimizer = set_up(byol, "--compile")
    model.compile()
    compiled = steps(byol, args, ctx, data, model, optimizer, 1)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled += steps(byol, args, ctx, data, model, optimizer, 2, first=1)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs > 0
    torch.testing.assert_close(torch.stack(compiled), torch.stack(eager), rtol=1e-4, atol=1e-5)
