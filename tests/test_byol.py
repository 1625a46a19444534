"""byol.py: augmentation, model, training loop, checkpoints and errors, on tiny synthetic data."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torchvision.transforms.v2.functional as TF

import byol
from conftest import TINY, load, write_jpeg_folder

SMALL_HEADS = ["--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "64"]


def run(tmp_path, *flags, name="run"):
    out = tmp_path / name
    history = byol.main([*TINY, *SMALL_HEADS, "--out-dir", str(out), *flags])
    return out, history


# --- augmentation ---------------------------------------------------------------------------------
def test_parameters_are_drawn_per_image_at_their_rates():
    torch.manual_seed(0)
    n = 20000
    params = byol.sample_view_params(n, 32, 32, byol.VIEWS[1], "cpu")
    view = byol.VIEWS[1]
    for key in ("flip", "jitter", "grayscale", "solarize"):
        assert abs(params[key].float().mean().item() - view[key]) < 0.015, key
    top, left, h, w = params["crop"].unbind(1)
    area = h * w / (32 * 32)
    assert area.min() >= view["crop_scale"][0] - 0.02 and area.max() <= 1
    assert (top + h <= 32).all() and (left + w <= 32).all() and (top >= 0).all() and (left >= 0).all()
    # Different images get different boxes, factors and orders (not one draw for the whole batch).
    assert len(torch.unique(params["crop"], dim=0)) > n // 2
    assert len(torch.unique(params["jitter_order"], dim=0)) == 24
    jittered = params["factors"][params["jitter"]]
    assert jittered[:, 0].std() > 0.2 and (params["factors"][~params["jitter"]] == 1).all()


def test_color_jitter_matches_torchvision_per_image():
    torch.manual_seed(1)
    images = torch.rand(48, 3, 12, 12)
    images[0] = 0.5  # grey: hue undefined
    images[1, :, :3] = 1.0  # saturated and equal channels
    params = byol.sample_view_params(48, 12, 12, {**byol.VIEW, "jitter": 0.9}, "cpu")
    out = byol.color_jitter(images, params["factors"], params["hue_shift"], params["jitter_order"], params["jitter"])
    blends = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for i in range(48):
        expected = images[i]
        if params["jitter"][i]:
            for op in params["jitter_order"][i].tolist():
                if op == 3:
                    expected = TF.adjust_hue(expected, params["hue_shift"][i].item())
                else:
                    expected = blends[op](expected, params["factors"][i, op].item())
        torch.testing.assert_close(out[i], expected, atol=2e-5, rtol=0)


def test_crop_and_flip_match_torchvision_per_image():
    torch.manual_seed(2)
    images = torch.rand(32, 3, 16, 16)
    params = byol.sample_view_params(32, 16, 16, byol.VIEW, "cpu")
    out = byol.crop_flip_resize(images, params["crop"], params["flip"], 16)
    for i in range(32):
        top, left, h, w = (int(v) for v in params["crop"][i])
        expected = TF.resized_crop(images[i], top, left, h, w, [16, 16], antialias=True)
        if params["flip"][i]:
            expected = TF.horizontal_flip(expected)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)


def test_augment_applies_each_images_own_flip():
    torch.manual_seed(3)
    images = torch.randint(0, 256, (256, 3, 8, 8), dtype=torch.uint8)
    flip_only = {**byol.VIEW, "crop_scale": (1.0, 1.0), "jitter": 0.0, "grayscale": 0.0}
    params = byol.sample_view_params(256, 8, 8, flip_only, "cpu")
    params["crop"] = torch.tensor([[0.0, 0.0, 8.0, 8.0]]).repeat(256, 1)  # ratio 3/4..4/3 may not be 1
    out = byol.apply_view(images, params, 8)
    x = images.float() / 255
    flipped = (out - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    same = (out - x).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert torch.equal(flipped, params["flip"]) and torch.equal(same, ~params["flip"])
    assert 0.35 < params["flip"].float().mean() < 0.65


# --- model and metrics ----------------------------------------------------------------------------
def test_ema_update_is_the_lerp_formula():
    torch.manual_seed(0)
    model = byol.BYOL(32, 16, 32)
    with torch.no_grad():
        for p in [*model.backbone.parameters(), *model.projector.parameters()]:
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in model.target_projector.parameters()]
    model.update_target(0.9)
    for old, new, online in zip(before, model.target_projector.parameters(), model.projector.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online)
    assert all(not p.requires_grad for p in model.target_backbone.parameters())


def test_collapse_metrics_separate_collapsed_from_healthy():
    torch.manual_seed(0)
    healthy = torch.randn(512, 64)
    collapsed = torch.randn(1, 64) + 1e-3 * torch.randn(512, 64)
    assert 0.9 < byol.collapse_metric(healthy) < 1.1
    assert byol.collapse_metric(collapsed) < 0.05
    assert byol.effective_rank(healthy) > 40 and byol.effective_rank(collapsed) < 1.5


def test_knn_finds_the_class_of_labelled_clusters():
    torch.manual_seed(0)
    centres = torch.randn(5, 32)
    train_y, test_y = torch.arange(200) % 5, torch.arange(50) % 5
    train = centres[train_y] + 0.3 * torch.randn(200, 32)
    test = centres[test_y] + 0.3 * torch.randn(50, 32)
    assert byol.knn_top1(train, train_y, test, test_y, k=20, temperature=0.1) == 1.0
    assert byol.knn_top1(train, train_y[torch.randperm(200)], test, test_y, k=20, temperature=0.1) < 0.6


def test_cosine_schedule_warms_up_then_decays():
    values = [byol.cosine_schedule(s, 100, 1.0, 0.0, warmup_steps=10) for s in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))
    assert byol.cosine_schedule(50, 100, 0.99, 1.0) == pytest.approx(0.995)


# --- training runs --------------------------------------------------------------------------------
def test_training_writes_checkpoint_metrics_and_plot(tmp_path, saved_figures):
    out, history = run(tmp_path, "--epochs", "3", "--warmup-epochs", "0")
    assert [row["epoch"] for row in history] == [1, 2, 3]
    losses = [row["loss"] for row in history]
    assert all(math.isfinite(v) for v in losses) and max(losses) - min(losses) > 1e-3
    for row in history:
        assert 0 <= row["knn_top1"] <= 1 and 0 < row["collapse"] < 1.5 and row["erank"] >= 1
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == history
    assert (out / "byol.png").exists()
    panels = saved_figures["byol.png"]  # the last figure written: one line of 3 epochs per panel
    assert [panel["title"] for panel in panels] == [title for _, title, _, _ in byol.figure_panels(None)]
    assert all(panel["lines"] == 1 for panel in panels)
    checkpoint = load(out / "checkpoint.pt")  # weights_only=True: plain types only
    assert checkpoint["script"] == "byol" and checkpoint["epoch"] == 3 and checkpoint["step"] == 12
    assert checkpoint["arch"]["backbone"] == "resnet18" and checkpoint["arch"]["backbone_kwargs"]["cifar_stem"]
    assert checkpoint["data"]["num_classes"] == 10 and len(checkpoint["data"]["mean"]) == 3
    model = byol.BYOL(64, 32, 64)
    model.load_state_dict(checkpoint["model"])  # strict
    backbone = {k[len("backbone."):]: v for k, v in checkpoint["model"].items() if k.startswith("backbone.")}
    byol.resnet18_backbone().load_state_dict(backbone)
    # The target moved towards the online network but is not equal to it.
    online, target = checkpoint["model"]["projector.0.weight"], checkpoint["model"]["target_projector.0.weight"]
    assert not torch.equal(online, target) and (online - target).abs().mean() < online.abs().mean()


TIMING = {"images_per_s", "epoch_time_s"}  # the only entries of a history row that depend on the machine


@pytest.mark.parametrize("stop_at", [4, 3, 6])  # 4 steps = 1 epoch; 3 and 6 stop inside an epoch
def test_resume_continues_exactly(stop_at, tmp_path):
    """A run stopped at any step and resumed in a fresh process ends with the uninterrupted run's weights,
    optimiser state and whole history (an epoch stopped inside keeps the sums of its steps)."""
    straight, _ = run(tmp_path, "--epochs", "2", name="straight")
    killed, _ = run(tmp_path, "--epochs", "2", "--max-steps", str(stop_at), name="killed")
    assert load(killed / "checkpoint.pt")["step"] == stop_at
    subprocess.run([sys.executable, byol.__file__, "--resume", str(killed / "checkpoint.pt")], check=True,
                   capture_output=True)
    a, b = load(straight / "checkpoint.pt"), load(killed / "checkpoint.pt")
    assert a["step"] == b["step"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for index, state in a["optimizer"]["state"].items():  # the SGD momentum buffers too
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][index]["momentum_buffer"]), index
    untimed = [[{key: value for key, value in row.items() if key not in TIMING} for row in saved["history"]]
               for saved in (a, b)]
    assert untimed[0] == untimed[1] and [row["epoch"] for row in untimed[0]] == [1, 2]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = byol.regression_loss

    def loss_that_breaks(prediction, target):
        calls["n"] += 1
        return real_loss(prediction, target) * (float("nan") if calls["n"] > 10 else 1.0)  # step 6 on

    monkeypatch.setattr(byol, "regression_loss", loss_that_breaks)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as stop:
        byol.main([*TINY, *SMALL_HEADS, "--epochs", "3", "--out-dir", str(out)])
    message = str(stop.value)
    assert "loss is nan" in message and "last good" in message and "\n" not in message
    checkpoint = load(out / "checkpoint.pt")
    assert checkpoint["epoch"] == 1 and all(torch.isfinite(v).all() for v in checkpoint["model"].values()
                                            if v.is_floating_point())


# --- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags", [["--no-such-flag"], ["--batch-size", "0"], ["--dataset", "imagenet"],
                                   ["--lr", "-1"], ["--ema-start", "1.5"]])
def test_bad_flags_exit_with_usage_error(flags, capsys):
    with pytest.raises(SystemExit) as stop:
        byol.main(flags)
    assert stop.value.code == 2 and "error:" in capsys.readouterr().err


def one_line_error(argv):
    with pytest.raises(SystemExit) as stop:
        byol.main(argv)
    message = str(stop.value)
    assert message.startswith("byol.py: error:") and "\n" not in message
    return message


def test_missing_empty_and_corrupt_folders_give_one_line_errors(tmp_path):
    """Each message says what is wrong, not only where (the paths are named so that none holds the words
    the test looks for), and no run folder is left behind."""
    flags = ["--dataset", "folder", "--device", "cpu", "--batch-size", "2", "--out-dir", str(tmp_path / "out")]
    assert "No such file or directory" in one_line_error([*flags, "--data-dir", str(tmp_path / "a")])
    (tmp_path / "b" / "train" / "cat").mkdir(parents=True)
    assert "Found no valid file for the classes cat" in one_line_error([*flags, "--data-dir", str(tmp_path / "b")])
    root = write_jpeg_folder(tmp_path / "c")
    (root / "train" / "cat" / "x.jpg").write_bytes(b"not a jpeg")
    message = one_line_error([*flags, "--data-dir", str(root)])
    assert "cannot decode image" in message and "x.jpg" in message and "UnidentifiedImageError" in message
    assert not (tmp_path / "out").exists()


def test_offline_cifar_says_how_to_point_at_a_local_copy(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Network is unreachable")

    monkeypatch.setattr(byol.torchvision.datasets, "CIFAR10", offline)
    message = one_line_error(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--device", "cpu"])
    assert "--data-dir" in message and "cifar-10-batches-py" in message


def test_folder_dataset_trains(tmp_path):
    root = write_jpeg_folder(tmp_path / "images", per_class=8)
    out = tmp_path / "folder-run"
    history = byol.main(["--dataset", "folder", "--data-dir", str(root), "--img-size", "16", "--batch-size", "8",
                         "--epochs", "1", "--device", "cpu", "--out-dir", str(out), *SMALL_HEADS])
    assert math.isfinite(history[0]["loss"])
    assert load(out / "checkpoint.pt")["data"]["classes"] == ["cat", "dog"]


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    assert "no checkpoint" in one_line_error(["--resume", str(tmp_path / "none.pt")])
    out, _ = run(tmp_path, "--epochs", "1")
    data = (out / "checkpoint.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    assert "truncated" in one_line_error(["--resume", str(tmp_path / "truncated.pt")])
    other = load(out / "checkpoint.pt")
    other["script"] = "simsiam"
    torch.save(other, tmp_path / "other.pt")
    assert "simsiam.py" in one_line_error(["--resume", str(tmp_path / "other.pt")])
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    assert "another program" in one_line_error(["--resume", str(tmp_path / "foreign.pt")])
    assert "differs from the checkpoint" in one_line_error(["--resume", str(out / "checkpoint.pt"), "--lr", "0.5"])
