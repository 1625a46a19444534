"""dino_vit.py: multi-crop blur, ViT, DINO head and loss, centring and sharpening, collapse diagnostics,
training loop, checkpoints and errors, on tiny synthetic data."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

import dino_vit
from conftest import TINY, load

TINY_VIT = dict(img_size=16, patch_size=4, dim=32, depth=2, heads=2, mlp_dim=64)
SMALL = ["--dim", "32", "--depth", "2", "--heads", "2", "--mlp-dim", "64", "--head-hidden", "64",
         "--bottleneck-dim", "16", "--out-dim", "64", "--local-crops", "2"]


def run(tmp_path, *flags, name="run"):
    out = tmp_path / name
    history = dino_vit.main([*TINY, *SMALL, "--out-dir", str(out), *flags])
    return out, history


def tiny_dino(centering=True):
    return dino_vit.DINO(TINY_VIT, drop_path=0.1, head_hidden=64, bottleneck_dim=16, out_dim=64, centering=centering,
                         student_temp=0.1, center_momentum=0.9)


# --- augmentation ---------------------------------------------------------------------------------
def test_blur_matches_torchvision_per_image():
    torch.manual_seed(0)
    for size, kernel_size in ((32, 3), (16, 3), (64, 7)):
        assert dino_vit.blur_kernel_size(size) == kernel_size
        images = torch.rand(12, 3, size, size)
        sigma = torch.empty(12).uniform_(*dino_vit.VIEW["blur_sigma"])
        out = dino_vit.gaussian_blur(images, sigma, kernel_size)
        for i in range(12):
            expected = TF.gaussian_blur(images[i], [kernel_size, kernel_size], [sigma[i].item()] * 2)
            torch.testing.assert_close(out[i], expected, atol=1e-6, rtol=0)
    assert dino_vit.blur_kernel_size(224) == 23  # torchvision's 10% of the image, as SimCLR and BYOL


def test_blur_is_drawn_per_image_with_dinos_probabilities():
    """DINO: blur always on the first global crop, rarely on the second, on half of the local crops."""
    torch.manual_seed(0)
    n = 20000
    for view, p in ((dino_vit.VIEWS[0], 1.0), (dino_vit.VIEWS[1], 0.1), (dino_vit.LOCAL_VIEW, 0.5)):
        blur, sigma = dino_vit.sample_blur(n, view, 224, "cpu")
        assert abs(blur.float().mean().item() - p) < 0.015
        assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean().item() - 1.05) < 0.02
        # The same blur relative to the image: sigma scales with the image size (0.29 px at most at 32 px).
        _, sigma_at_32 = dino_vit.sample_blur(n, view, 32, "cpu")
        assert sigma_at_32.min() >= 0.1 * 32 / 224 and sigma_at_32.max() <= 2.0 * 32 / 224
    assert [view["solarize"] for view in dino_vit.VIEWS] == [0.0, 0.2] and dino_vit.LOCAL_VIEW["solarize"] == 0


def test_augment_blurs_only_the_images_drawn_for_it():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    view = {**dino_vit.LOCAL_VIEW, "blur": 0.5}
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    torch.manual_seed(1)
    out = dino_vit.augment(images, view, zero, one, dino_vit.compute_settings("cpu"), 8)
    torch.manual_seed(1)
    params = dino_vit.sample_view_params(64, 16, 16, view, "cpu")
    blur, sigma = params["blur"], params["blur_sigma"]
    plain = dino_vit.apply_view(images, params, 8)
    torch.testing.assert_close(out[~blur], plain[~blur])
    torch.testing.assert_close(out[blur], dino_vit.gaussian_blur(plain, sigma, 3)[blur])
    assert 0 < blur.sum() < 64


# --- model ----------------------------------------------------------------------------------------
def test_vit_takes_local_crops_and_drops_paths_only_in_training():
    torch.manual_seed(0)
    vit = dino_vit.ViT(**TINY_VIT, drop_path=0.5)
    images = torch.randn(6, 3, 16, 16)
    assert vit(images).shape == (6, 32) and vit(images[:, :, :8, :8]).shape == (6, 32)
    # The 4x4 grid the embeddings were learned for is used as is; a 2x2 grid gets them resized.
    assert torch.equal(vit.position_embedding(4, 4), vit.pos_embed)
    resized = vit.position_embedding(2, 2)
    assert resized.shape == (1, 5, 32) and torch.equal(resized[:, 0], vit.pos_embed[:, 0])
    assert vit.drop_path_rates == pytest.approx([0.0, 0.5])
    assert not torch.equal(vit(images), vit(images))  # random residual branches dropped per image
    vit.eval()
    assert torch.equal(vit(images), vit(images))


def test_teacher_starts_as_the_student_without_drop_path_or_gradients():
    model = tiny_dino()
    teacher_weights = model.teacher_backbone.state_dict().values()
    for (name, student), teacher in zip(model.backbone.state_dict().items(), teacher_weights):
        assert torch.equal(student, teacher), name
    assert model.backbone.drop_path_rates[-1] == pytest.approx(0.1)
    assert set(model.teacher_backbone.drop_path_rates) == {0}
    assert not any(p.requires_grad for p in [*model.teacher_backbone.parameters(), *model.teacher_head.parameters()])


def test_head_scores_are_cosines_with_prototypes_of_fixed_norm():
    torch.manual_seed(0)
    head = dino_vit.DINOHead(32, 64, 16, 50)
    weight = head.last_layer.weight  # weight norm: magnitude (fixed at 1) times direction
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(50))
    assert not head.last_layer.parametrizations.weight.original0.requires_grad
    logits, bottleneck = head(torch.randn(8, 32))
    assert logits.shape == (8, 50) and bottleneck.shape == (8, 16)
    torch.testing.assert_close(logits, F.normalize(bottleneck, dim=1) @ weight.T)
    assert logits.abs().max() <= 1 + 1e-6


def test_ema_update_is_the_lerp_formula():
    torch.manual_seed(0)
    model = tiny_dino()
    with torch.no_grad():
        for p in model.head.mlp.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.teacher_head.mlp.parameters()]
    model.update_teacher(0.9)
    for old, new, student in zip(before, model.teacher_head.mlp.parameters(), model.head.mlp.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * student)


def test_teacher_sees_the_global_crops_and_the_student_every_crop():
    torch.manual_seed(0)
    model = tiny_dino().eval()  # no drop-path, so the student's outputs can be recomputed
    global_views, local_views = torch.randn(2 * 4, 3, 16, 16), torch.randn(3 * 4, 3, 8, 8)
    loss, entropy, center_kl, teacher_bottleneck = model(global_views, local_views, torch.tensor(0.04))
    with torch.no_grad():
        student = torch.cat([model.head(model.backbone(global_views))[0], model.head(model.backbone(local_views))[0]])
        teacher, bottleneck = model.teacher_head(model.teacher_backbone(global_views))
    expected = dino_vit.dino_loss(student.view(5, 4, 64), teacher.view(2, 4, 64), torch.zeros(64), 0.04, 0.1)
    torch.testing.assert_close((loss, entropy, center_kl), expected)
    torch.testing.assert_close(teacher_bottleneck, bottleneck[:4])


def test_center_is_the_ema_of_the_teacher_batch_mean_and_stays_zero_without_centering():
    torch.manual_seed(0)
    global_views, local_views = torch.randn(2 * 4, 3, 16, 16), torch.randn(3 * 4, 3, 8, 8)
    temp = torch.tensor(0.04)
    for centering in (True, False):
        model = tiny_dino(centering)
        with torch.no_grad():
            teacher_mean = model.teacher_head(model.teacher_backbone(global_views))[0].mean(dim=0)
        model(global_views, local_views, temp)
        model(global_views, local_views, temp)
        expected = (0.1 + 0.9 * 0.1) * teacher_mean if centering else torch.zeros(64)  # two steps of m = 0.9
        torch.testing.assert_close(model.center, expected)


# --- loss and schedules ---------------------------------------------------------------------------
def test_dino_loss_is_the_cross_entropy_of_every_teacher_crop_with_every_other_student_crop():
    torch.manual_seed(0)
    crops, batch, k = 5, 3, 7
    student, teacher, center = torch.randn(crops, batch, k), torch.randn(2, batch, k), torch.randn(k)
    loss, entropy, center_kl = dino_vit.dino_loss(student, teacher, center, 0.04, 0.1)
    expected, pairs = 0.0, 0
    for t in range(2):
        p_t = F.softmax((teacher[t] - center) / 0.04, dim=1)
        for v in range(crops):
            if v != t:
                expected += -(p_t * F.log_softmax(student[v] / 0.1, dim=1)).sum(dim=1).mean()
                pairs += 1
    torch.testing.assert_close(loss, expected / pairs)
    p = F.softmax((teacher - center) / 0.04, dim=-1)
    torch.testing.assert_close(entropy, -(p * p.log()).sum(dim=-1).mean())
    assert loss >= entropy  # the rest is KL(teacher || student) >= 0
    # KL(teacher || centre): each of the 2 x 3 teacher distributions against their mean.
    p = p.flatten(0, 1)
    torch.testing.assert_close(center_kl, F.kl_div(p.mean(dim=0).log().expand_as(p), p, reduction="batchmean"))


def test_centering_flattens_and_sharpening_peaks_a_collapsed_teacher():
    """A teacher that gives every image the same scores: centred, its distribution is uniform
    (entropy log K); uncentred and sharpened, the top prototype takes almost all the mass. Either way
    KL(teacher || centre) is 0; a teacher that sends images to different prototypes has it high."""
    torch.manual_seed(0)
    # Cosines of one l2-normalised output with 64 unit-norm prototypes, the same for every image.
    scores = F.normalize(torch.randn(64, 16), dim=1) @ F.normalize(torch.randn(16), dim=0)
    teacher = scores.expand(2, 8, 64)
    student = torch.randn(4, 8, 64)
    _, centred, centred_kl = dino_vit.dino_loss(student, teacher, scores, 0.04, 0.1)
    _, sharpened, sharpened_kl = dino_vit.dino_loss(student, teacher, torch.zeros(64), 0.04, 0.1)
    _, soft, _ = dino_vit.dino_loss(student, teacher, torch.zeros(64), 0.1, 0.1)
    assert centred.item() == pytest.approx(math.log(64), abs=1e-5)
    assert sharpened < soft - 1 and soft < math.log(64) - 1
    assert abs(centred_kl) < 1e-5 and abs(sharpened_kl) < 1e-5
    # Image i scores 1 on prototype i, -1 elsewhere: sharpened, each is nearly one-hot on its own.
    diverse = (2 * torch.eye(64)[:16] - 1).expand(2, 16, 64)
    _, _, diverse_kl = dino_vit.dino_loss(torch.randn(4, 16, 64), diverse, torch.zeros(64), 0.04, 0.1)
    assert diverse_kl.item() == pytest.approx(math.log(16), abs=1e-3)


def test_teacher_temperature_warms_up_linearly_then_stays():
    values = [dino_vit.teacher_temperature(s, 10, 0.04, 0.07) for s in range(20)]
    assert values[0] == pytest.approx(0.04) and values[5] == pytest.approx(0.055)
    assert values[10] == values[19] == 0.07


def test_clipping_limits_each_parameter_gradient_on_its_own():
    big, small = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(3))
    big.grad, small.grad = torch.tensor([6.0, 0.0, 8.0, 0.0]), torch.tensor([0.3, 0.4, 0.0])
    dino_vit.clip_gradients([big, small], 3.0)
    torch.testing.assert_close(big.grad, torch.tensor([1.8, 0.0, 2.4, 0.0]))  # norm 10 -> 3, same direction
    torch.testing.assert_close(small.grad, torch.tensor([0.3, 0.4, 0.0]))  # norm 0.5: untouched


# --- training runs --------------------------------------------------------------------------------
def test_training_with_local_crops_writes_a_checkpoint_the_eval_tools_can_rebuild(tmp_path, saved_figures):
    out, history = run(tmp_path, "--epochs", "2", "--warmup-epochs", "0", "--lr", "0.01")
    assert [row["epoch"] for row in history] == [1, 2]
    losses = [row["loss"] for row in history]
    assert all(math.isfinite(v) for v in losses) and abs(losses[1] - losses[0]) > 1e-3
    for row in history:
        assert 0 < row["teacher_entropy"] < math.log(64) and row["kl_teacher_student"] >= 0
        assert 0 < row["kl_teacher_center"] < math.log(64)
        assert 0 <= row["knn_top1"] <= 1 and row["erank"] >= 1 and row["teacher_temp"] < 0.07
    panels = saved_figures["dino_vit.png"]
    expected = [title for _, title, _, _ in dino_vit.figure_panels(dino_vit.get_args([]))]
    assert [panel["title"] for panel in panels] == expected and all(panel["lines"] >= 1 for panel in panels)
    checkpoint = load(out / "checkpoint.pt")
    assert checkpoint["script"] == "dino_vit" and checkpoint["epoch"] == 2 and checkpoint["step"] == 8
    arch, model = checkpoint["arch"], checkpoint["model"]
    assert arch["backbone"] == "vit" and arch["backbone_kwargs"] == TINY_VIT and arch["feature_dim"] == 32
    # The teacher backbone and its head MLP, rebuilt from "arch" alone, load strictly.
    backbone = dino_vit.ViT(**arch["backbone_kwargs"])
    backbone.load_state_dict({k[len(arch["backbone_prefix"]):]: v for k, v in model.items()
                              if k.startswith(arch["backbone_prefix"])})
    assert arch["projector_layers"] == ["linear", "gelu", "linear", "gelu", "linear"]
    projector = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16))
    projector.load_state_dict({k[len(arch["projector_prefix"]):]: v for k, v in model.items()
                               if k.startswith(arch["projector_prefix"])})
    full = tiny_dino()
    full.load_state_dict(model)  # strict: student, teacher and centre
    assert full.center.abs().sum() > 0
    # Weight decay only on the weights (group 0, at its scheduled value), never on biases and norms.
    groups = checkpoint["optimizer"]["param_groups"]
    assert groups[0]["weight_decay"] > 0.04 and groups[1]["weight_decay"] == 0
    trainable = [p for p in full.parameters() if p.requires_grad]
    assert len(groups[1]["params"]) == sum(p.ndim == 1 for p in trainable) > 0


def test_prototypes_stay_fixed_in_the_first_epoch_and_resume_is_exact(tmp_path):
    flags = ["--epochs", "2", "--warmup-epochs", "0", "--lr", "0.01"]
    straight, _ = run(tmp_path, *flags, name="straight")
    killed, _ = run(tmp_path, *flags, "--max-steps", "3", name="killed")  # stopped inside epoch 1 of 4 steps
    first = load(killed / "checkpoint.pt")["model"]
    prototypes = "head.last_layer.parametrizations.weight.original1"
    assert torch.equal(first[prototypes], first["teacher_" + prototypes])  # student's never moved
    assert not torch.equal(first["head.mlp.0.weight"], first["teacher_head.mlp.0.weight"])
    history = dino_vit.main(["--resume", str(killed / "checkpoint.pt")])
    assert [row["epoch"] for row in history] == [1, 2]
    a, b = load(straight / "checkpoint.pt"), load(killed / "checkpoint.pt")
    assert a["step"] == b["step"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["history"][-1]["loss"] == b["history"][-1]["loss"]
    assert not torch.equal(a["model"][prototypes], a["model"]["teacher_" + prototypes])  # trained in epoch 2


def test_entropy_tells_the_two_collapse_modes_from_the_default(tmp_path):
    """DINO Sec. 5.3: without sharpening the teacher output goes uniform (entropy near log K),
    without centring one prototype dominates (entropy near 0); with both it stays in between."""
    flags = ["--epochs", "4", "--warmup-epochs", "0", "--lr", "0.02", "--ema-start", "0.9", "--eval-every", "4"]
    entropy = {}  # of the last epoch, as a fraction of log K
    for ablation in ("", "--no-sharpening", "--no-centering"):
        _, history = run(tmp_path, *flags, *([ablation] if ablation else []), name=ablation or "default")
        entropy[ablation] = history[-1]["teacher_entropy"] / math.log(64)
    assert entropy["--no-sharpening"] > 0.9
    assert 0.1 < entropy[""] < 0.6
    assert entropy["--no-centering"] < 0.05


def test_runs_without_local_crops(tmp_path):
    _, history = run(tmp_path, "--epochs", "1", "--local-crops", "0")
    assert math.isfinite(history[0]["loss"])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = dino_vit.dino_loss

    def loss_that_breaks(*args):
        calls["n"] += 1
        loss, entropy, center_kl = real_loss(*args)
        return loss * (float("nan") if calls["n"] > 5 else 1.0), entropy, center_kl  # step 6 on

    monkeypatch.setattr(dino_vit, "dino_loss", loss_that_breaks)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as stop:
        dino_vit.main([*TINY, *SMALL, "--epochs", "3", "--out-dir", str(out)])
    message = str(stop.value)
    assert "loss is nan" in message and "last good" in message and "\n" not in message
    assert load(out / "checkpoint.pt")["epoch"] == 1


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [["--patch-size", "3"], ["--img-size", "20"], ["--dim", "30", "--heads", "4"],
                                   ["--teacher-temp", "0"], ["--local-crops", "-1"], ["--drop-path", "1"]])
def test_bad_flags_exit_with_usage_error(flags, capsys):
    with pytest.raises(SystemExit) as stop:
        dino_vit.main(flags)
    assert stop.value.code == 2 and "error:" in capsys.readouterr().err


def test_checkpoint_of_another_script_gives_a_one_line_error(tmp_path):
    torch.save({"script": "byol", "format": 1}, tmp_path / "byol.pt")
    with pytest.raises(SystemExit) as stop:
        dino_vit.main(["--resume", str(tmp_path / "byol.pt")])
    message = str(stop.value)
    assert message.startswith("dino_vit.py: error:") and "byol.py" in message and "\n" not in message
