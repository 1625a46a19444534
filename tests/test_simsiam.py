"""simsiam.py: the paper's heads, loss and stop-gradient, its three ablations, the non-decayed
predictor learning rate, and collapse with and without stop-gradient, on tiny synthetic data."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import simsiam
import spectrum
from conftest import TINY, load

SMALL_HEADS = ["--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "16"]
# The collapse runs keep the paper's heads and a nearly constant, high learning rate (the cosine
# spans 100 epochs, the runs stop after 32 steps): without stop-gradient the embedding collapses
# within these steps, with it the embedding stays spread and the kNN accuracy rises (seeds 0-4).
COLLAPSE_RUN = [*TINY, "--lr", "2", "--epochs", "100", "--max-steps", "32", "--eval-every", "1000"]


def run(tmp_path, *flags, name="run"):
    out = tmp_path / name
    history = simsiam.main([*TINY, *SMALL_HEADS, "--out-dir", str(out), *flags])
    return out, history


# --- recipe, model and loss -----------------------------------------------------------------------
def test_defaults_and_heads_are_the_papers_cifar_recipe():
    args = simsiam.get_args([])
    assert (args.lr, args.weight_decay, args.momentum, args.batch_size, args.warmup_epochs) == (0.03, 5e-4, 0.9, 512, 0)
    assert args.fix_pred_lr and not (args.no_stop_grad or args.no_predictor or args.fixed_predictor)
    assert simsiam.VIEWS[0] == simsiam.VIEWS[1] == dict(
        crop_scale=(0.2, 1.0), flip=0.5, jitter=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
        grayscale=0.2, solarize=0.0, blur=0.0, blur_sigma=(0.1, 2.0))
    # From 96 px: the ImageNet recipe's blur, probability 0.5 for both views (official main_simsiam.py).
    assert [view["blur"] for view in simsiam.LARGE_VIEWS] == [0.5, 0.5]

    model = simsiam.SimSiam(args.proj_hidden, args.proj_dim, args.pred_hidden)
    layout = [(type(m).__name__, getattr(m, "in_features", None), getattr(m, "out_features", None),
               getattr(m, "bias", None) is not None or getattr(m, "affine", False)) for m in model.projector]
    assert layout == [("Linear", 512, 2048, False), ("BatchNorm1d", None, None, True), ("ReLU", None, None, False),
                      ("Linear", 2048, 2048, False), ("BatchNorm1d", None, None, False)]
    assert simsiam.layer_names(model.projector) == ["linear", "bn", "relu", "linear", "bn"]
    bottleneck = [(m.in_features, m.out_features, m.bias is not None) for m in model.predictor
                  if isinstance(m, nn.Linear)]
    assert bottleneck == [(2048, 512, False), (512, 2048, True)]
    assert isinstance(model.predictor[1], nn.BatchNorm1d) and len(model.predictor) == 4  # no BN on the output


def test_loss_is_the_symmetrised_negative_cosine():
    torch.manual_seed(0)
    model = simsiam.SimSiam(64, 32, 16)
    view1, view2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    loss, z1, before_bn1 = model(view1, view2)
    with torch.no_grad():
        z = [model.projector(model.backbone(v)) for v in (view1, view2)]
        p = [model.predictor(zi) for zi in z]
        before_bn = model.projector[:-1](model.backbone(view1))
    expected = -0.5 * (F.cosine_similarity(p[0], z[1]).mean() + F.cosine_similarity(p[1], z[0]).mean())
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(z1, z[0])
    torch.testing.assert_close(before_bn1, before_bn)  # what the output batch norm normalises into z1
    assert isinstance(model.projector[-1], nn.BatchNorm1d)
    assert -1 <= loss.item() <= 1


def test_stop_gradient_halves_the_gradient_of_a_predictorless_siamese_network():
    """Sec. 4.2: with the identity as predictor, the stop-gradient loss has exactly half the
    gradient of -cos(z1, z2) taken through both branches, so it collapses the same way."""
    torch.manual_seed(0)
    model = simsiam.SimSiam(64, 32, 16, predictor="identity")
    views = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    grads = {}
    for stop_grad in (True, False):
        model.stop_grad = stop_grad
        model.zero_grad()
        model(*views)[0].backward()
        grads[stop_grad] = [p.grad.clone() for p in model.parameters()]
    assert sum(g.abs().sum() for g in grads[True]) > 0
    for half, full in zip(grads[True], grads[False]):
        torch.testing.assert_close(half, full / 2, atol=1e-6, rtol=1e-4)


# --- ablations and the predictor's learning rate ----------------------------------------------
@pytest.mark.parametrize("flag, predictor", [("--no-stop-grad", "learned"), ("--no-predictor", "identity"),
                                             ("--fixed-predictor", "fixed")])
def test_each_ablation_runs(flag, predictor, tmp_path):
    out, history = run(tmp_path, "--epochs", "1", flag)
    assert math.isfinite(history[-1]["loss"]) and 0 <= history[-1]["collapse"] < 1.5
    checkpoint = load(out / "checkpoint.pt")
    assert checkpoint["args"][flag[2:].replace("-", "_")]
    rebuilt = simsiam.SimSiam(64, 32, 16, flag != "--no-stop-grad", predictor)
    rebuilt.load_state_dict(checkpoint["model"])  # strict: the saved layout is this ablation's
    predictor_group = checkpoint["optimizer"]["param_groups"][1]
    if predictor == "learned":
        assert len(predictor_group["params"]) == 5  # two Linear weights, one bias, the BN affine pair
    else:
        assert predictor_group["params"] == []
    if predictor == "identity":
        assert not any(key.startswith("predictor.") for key in checkpoint["model"])
    if predictor == "fixed":
        torch.manual_seed(0)  # main() builds the model right after seeding with --seed 0
        fresh = simsiam.SimSiam(64, 32, 16, predictor="fixed").state_dict()
        for key, value in checkpoint["model"].items():
            if key.startswith("predictor.") and "running" not in key and "num_batches" not in key:
                assert torch.equal(value, fresh[key]), key
        assert not torch.equal(checkpoint["model"]["projector.0.weight"], fresh["projector.0.weight"])


def test_ablation_flags_exclude_each_other_and_a_resumed_run_keeps_its_own(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        simsiam.main(["--no-predictor", "--fixed-predictor"])
    assert stop.value.code == 2 and "not allowed with" in capsys.readouterr().err
    out, _ = run(tmp_path, "--epochs", "2", "--max-steps", "1")
    with pytest.raises(SystemExit) as stop:
        simsiam.main(["--resume", str(out / "checkpoint.pt"), "--no-stop-grad"])
    message = str(stop.value)
    assert message.startswith("simsiam.py: error:") and "differs from the checkpoint" in message


def test_a_run_from_before_collapse_pre_bn_was_logged_resumes_and_draws_every_panel(tmp_path, saved_figures):
    """Its old rows have no collapse_pre_bn: the panel gets a gap there, not a KeyError."""
    out, _ = run(tmp_path, "--epochs", "1")
    checkpoint = load(out / "checkpoint.pt")
    checkpoint["history"] = [{key: value for key, value in row.items() if key != "collapse_pre_bn"}
                             for row in checkpoint["history"]]
    torch.save(checkpoint, out / "checkpoint.pt")
    history = simsiam.main(["--resume", str(out / "checkpoint.pt"), "--epochs", "2"])
    assert [("collapse_pre_bn" in row) for row in history] == [False, True]
    panels = saved_figures["simsiam.png"]
    assert len(panels) == len(simsiam.figure_panels(simsiam.get_args([]))) and all(p["lines"] == 1 for p in panels)
    [old, new] = next(p for p in panels if p["title"].startswith("collapse metric before"))["ydata"][0]
    assert math.isnan(old) and new == pytest.approx(history[1]["collapse_pre_bn"])  # a gap, not a value


def test_train_step_measures_collapse_in_front_of_and_behind_the_output_batch_norm():
    """collapse_pre_bn is the collapse metric of the step's own projector output in front of its last batch
    norm; collapse and off_axis are taken of the output behind it."""
    args = simsiam.get_args([*TINY, *SMALL_HEADS])
    compute = simsiam.compute_settings("cpu")
    data = simsiam.prepare_data(args, compute.device)
    torch.manual_seed(0)
    model = simsiam.build_model(args)
    outputs = []

    def forward(view1, view2):
        outputs.append(model(view1, view2))
        return outputs[-1]

    metrics = simsiam.train_step(model, forward, simsiam.make_optimizer(model, args), data["train_x"][:16],
                                 simsiam.hyperparameters(0, 100, 4, args), args, data, compute)
    _, z1, before_bn1 = outputs[0]
    torch.testing.assert_close(metrics["collapse_pre_bn"], simsiam.collapse_metric(before_bn1.detach()))
    torch.testing.assert_close(metrics["collapse"], simsiam.collapse_metric(z1.detach()))
    torch.testing.assert_close(metrics["off_axis"], simsiam.off_axis_share(z1.detach()))
    assert abs(metrics["collapse_pre_bn"] - metrics["collapse"]) > 0.01  # two different tensors


@pytest.fixture(scope="module")
def interrupted_and_straight(tmp_path_factory):
    """Two epochs straight, and the same run stopped inside its first epoch and resumed."""
    tmp = tmp_path_factory.mktemp("resume")
    straight, history = run(tmp, "--epochs", "2", name="straight")
    killed, _ = run(tmp, "--epochs", "2", "--max-steps", "3", name="killed")  # 4 steps = 1 epoch
    resumed = simsiam.main(["--resume", str(killed / "checkpoint.pt")])
    return straight, history, killed, resumed


def test_predictor_keeps_the_base_lr_while_the_encoder_decays(interrupted_and_straight):
    straight, history, _, _ = interrupted_and_straight
    groups = load(straight / "checkpoint.pt")["optimizer"]["param_groups"]
    base = 0.03 * 16 / 256
    # 8 steps: the last one used the cosine at step 7 of 8; the predictor stays at the base rate.
    assert groups[0]["lr"] == pytest.approx(simsiam.cosine_schedule(7, 8, base, 0.0)) == history[-1]["lr"]
    assert groups[0]["lr"] < base / 10 and groups[1]["lr"] == pytest.approx(base)
    assert [g["fixed_lr"] for g in groups] == [False, True]


def test_resume_continues_exactly(interrupted_and_straight):
    straight, _, killed, resumed = interrupted_and_straight
    assert [row["epoch"] for row in resumed] == [1, 2]
    a, b = load(straight / "checkpoint.pt"), load(killed / "checkpoint.pt")
    assert a["step"] == b["step"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["history"][-1]["loss"] == b["history"][-1]["loss"]


def test_checkpoint_outputs_and_projector_rebuilt_by_the_eval_tools(interrupted_and_straight, saved_figures,
                                                                   tmp_path):
    straight, history, _, _ = interrupted_and_straight
    assert [row["epoch"] for row in history] == [1, 2]
    assert all(math.isfinite(row["loss"]) and 0 <= row["knn_top1"] <= 1 for row in history)
    assert (straight / "metrics.jsonl").exists() and (straight / "simsiam.png").exists()
    panels = simsiam.figure_panels(simsiam.get_args([]))  # the run's figure, drawn again from its history
    simsiam.plot_history(history, tmp_path / "simsiam.png", panels)
    assert [panel["title"] for panel in saved_figures["simsiam.png"]] == [title for _, title, _, _ in panels]
    assert all(panel["lines"] >= 1 for panel in saved_figures["simsiam.png"])
    checkpoint = load(straight / "checkpoint.pt")
    assert checkpoint["script"] == "simsiam" and checkpoint["epoch"] == 2
    assert checkpoint["arch"]["projector_layers"] == ["linear", "bn", "relu", "linear", "bn"]
    projector = spectrum.build_projector(checkpoint, straight / "checkpoint.pt").eval()
    model = simsiam.SimSiam(64, 32, 16)
    model.load_state_dict(checkpoint["model"])
    features = torch.randn(20, 512)
    torch.testing.assert_close(projector(features), model.projector.eval()(features))


# --- collapse -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def collapse_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("collapse")
    args = simsiam.get_args(COLLAPSE_RUN)
    torch.manual_seed(args.seed)  # the model main() starts from
    initial = simsiam.SimSiam(args.proj_hidden, args.proj_dim, args.pred_hidden)
    compute = simsiam.compute_settings("cpu")
    at_step0 = simsiam.evaluate(initial, simsiam.prepare_data(args, compute.device), args, compute)
    default = simsiam.main([*COLLAPSE_RUN, "--out-dir", str(tmp / "default")])[-1]
    no_stop_grad = simsiam.main([*COLLAPSE_RUN, "--no-stop-grad", "--out-dir", str(tmp / "no-stop-grad")])[-1]
    return at_step0, default, no_stop_grad


@pytest.mark.parametrize("batch, one_side", [(512, 256), (512, 461), (512, 511), (64, 63)])
def test_batch_normed_rank_one_embedding_reads_sqrt_of_one_minus_mean_sign_squared(batch, one_side):
    """The projector's affine-free output batch norm bounds the collapse metric of a training batch:
    outputs on one line through the origin read sqrt(1 - m^2), m the mean sign (README, SimSiam)."""
    torch.manual_seed(0)
    direction = (0.5 + torch.rand(256)) * torch.randn(256).sign()  # no entry near 0, where BN's eps would act
    scale = torch.cat([-torch.ones(one_side), torch.full((batch - one_side,), one_side / (batch - one_side))])
    z = simsiam.SimSiam(64, 256, 16).projector[-1](scale[:, None] * direction)  # the output batch norm
    mean_sign = scale.sign().mean().item()
    expected = math.sqrt(1 - mean_sign ** 2)
    assert simsiam.collapse_metric(z).item() == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("one_side", [256, 461, 511])
def test_off_axis_share_reads_zero_for_a_rank_one_embedding_behind_the_batch_norm(one_side):
    """Where the collapse metric reads sqrt(1 - m^2) (up to 1), the share of variance off the main axis
    reads 0; for a spread embedding it is the exact 1 - lambda_max / trace, near 1."""
    torch.manual_seed(0)
    direction = (0.5 + torch.rand(256)) * torch.randn(256).sign()
    scale = torch.cat([-torch.ones(one_side), torch.full((512 - one_side,), one_side / (512 - one_side))])
    output_bn = simsiam.SimSiam(64, 256, 16).projector[-1]
    collapsed = output_bn(scale[:, None] * direction)
    assert simsiam.collapse_metric(collapsed).item() > 0.08
    assert simsiam.off_axis_share(collapsed).item() < 1e-4
    spread = output_bn(torch.randn(512, 256) @ torch.randn(256, 256))
    centred = torch.nn.functional.normalize(spread, dim=1)
    eigenvalues = torch.linalg.eigvalsh(torch.cov(centred.T, correction=0).double())
    exact = 1 - (eigenvalues[-1] / eigenvalues.sum()).item()
    assert simsiam.off_axis_share(spread).item() == pytest.approx(exact, abs=0.01) and exact > 0.8


def test_collapse_pre_bn_sees_the_one_point_that_the_output_batch_norm_spreads():
    """Outputs at one point up to a full-rank jitter of 1e-3 of their size: the output batch norm spreads the
    jitter over unit variance, so behind it the collapse metric reads about 1 and off_axis nearly its ceiling;
    in front of it (collapse_pre_bn) the collapse metric reads about 0."""
    torch.manual_seed(0)
    before_bn = torch.randn(256) + 1e-3 * torch.randn(512, 256)
    z = simsiam.SimSiam(64, 256, 16).projector[-1](before_bn)
    assert simsiam.collapse_metric(before_bn).item() < 0.01
    assert simsiam.collapse_metric(z).item() > 0.95 and simsiam.off_axis_share(z).item() > 0.9


def test_without_stop_gradient_the_embedding_collapses(collapse_runs):
    _, default, no_stop_grad = collapse_runs
    assert default["step"] == no_stop_grad["step"] == 32
    # The projector ends in batch norm, which keeps every output dimension at unit variance over
    # the batch: the collapsed embedding is a few directions, not one point. The collapse metric
    # falls well below the default's; the effective rank by more than ten times. Both are asserted as
    # separations: the exact values depend on the CPU's kernels.
    assert default["collapse"] > 0.75 and no_stop_grad["collapse"] < default["collapse"] - 0.1
    assert no_stop_grad["erank"] < default["erank"] / 10
    # Seen through the output batch norm: the collapsed batch lies close to one line; in front of it, the
    # outputs draw together towards one point.
    assert no_stop_grad["off_axis"] < default["off_axis"] / 4
    assert no_stop_grad["collapse_pre_bn"] < default["collapse_pre_bn"] - 0.15


def test_default_run_knn_rises_above_its_value_at_step_0(collapse_runs):
    at_step0, default, _ = collapse_runs
    assert default["knn_top1"] > at_step0["knn_top1"]
