"""collapse_demo.py: regimes that must collapse do, the ones that must not do not, on tiny synthetic data."""
import json

import pytest
import torch
import torch.nn.functional as F

import collapse_demo
from conftest import TINY

SMALL_VIT = ["--dim", "32", "--depth", "1", "--heads", "2", "--mlp-dim", "64", "--head-hidden", "64",
             "--head-dim", "32"]
SMALL_HEADS = ["--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "64"]


def run(tmp_path, regimes, *flags):
    out = tmp_path / "run"
    summary = collapse_demo.main([*TINY, *SMALL_VIT, *SMALL_HEADS, "--regimes", regimes, "--out-dir", str(out),
                                  *flags])
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, summary, history


def first_loss(history, regime):
    return next(row["loss"] for row in history if row["regime"] == regime)


def test_no_stop_grad_collapses_where_stop_grad_does_not(tmp_path, saved_figures):
    out, summary, history = run(tmp_path, "stop-grad,no-stop-grad", "--steps", "40", "--eval-every", "20",
                                "--log-every", "1", "--lr", "0.8")
    healthy, collapsed = summary["stop-grad"], summary["no-stop-grad"]
    # SimSiam Fig. 2: without stop-gradient the outputs become one point within a few steps.
    assert collapsed["collapse"] < 0.15 and collapsed["collapse"] < 0.3 * healthy["collapse"]
    assert collapsed["eval_collapse"] < 0.3 * healthy["eval_collapse"]
    assert collapsed["erank"] < 0.5 * healthy["erank"]
    # Same initial weights and the same batches: the very first losses agree (only the gradient differs).
    assert first_loss(history, "stop-grad") == pytest.approx(first_loss(history, "no-stop-grad"), abs=1e-5)

    saved = json.loads((out / "summary.json").read_text())
    assert list(saved["regimes"]) == ["stop-grad", "no-stop-grad"] and saved["args"]["steps"] == 40
    for name, regime in saved["regimes"].items():
        shares = regime["spectrum"]
        assert len(shares) == 32 and sum(shares) == pytest.approx(1, abs=1e-4)
        assert shares == sorted(shares, reverse=True)
        assert [row["step"] for row in history if row["regime"] == name] == list(range(1, 41))
        assert [row["step"] for row in history if row["regime"] == name and "knn_top1" in row] == [20, 40]
    # A collapsed embedding has one direction: the other directions hold almost none of its energy.
    tail = {name: 1 - regime["spectrum"][0] for name, regime in saved["regimes"].items()}
    assert tail["no-stop-grad"] < 0.1 * tail["stop-grad"]
    panels = saved_figures["collapse_demo.png"]  # one family: four curves over steps, then the final spectra
    assert len(panels) == 5 and all(title.startswith("SimSiam") for title in [panel["title"] for panel in panels])
    assert [panel["lines"] >= 2 for panel in panels] == [True] * 5  # both regimes in every panel


def test_sgd_on_the_teacher_drives_the_loss_to_zero_and_ema_does_not(tmp_path):
    _, summary, history = run(tmp_path, "sgd-both,ema", "--steps", "30", "--eval-every", "30", "--log-every", "1",
                              "--vit-lr", "0.1")
    assert first_loss(history, "sgd-both") == pytest.approx(first_loss(history, "ema"), abs=1e-5)
    # Teacher and student agree on one class for every token: cross-entropy 0, outputs all alike.
    assert summary["sgd-both"]["loss"] < 0.1 * summary["ema"]["loss"]
    assert summary["sgd-both"]["collapse"] < 0.1 and summary["sgd-both"]["erank"] < 1.1


def test_rows_at_log_and_eval_steps(tmp_path):
    _, _, history = run(tmp_path, "frozen-teacher", "--steps", "10", "--log-every", "4", "--eval-every", "5")
    assert [row["step"] for row in history] == [4, 5, 8, 10]
    assert [row["step"] for row in history if "knn_top1" in row] == [5, 10]
    # A frozen random teacher: the loss stays where it started (the blog's plateau).
    assert history[-1]["loss"] == pytest.approx(history[0]["loss"], rel=1e-3)


def test_a_second_run_refuses_the_first_runs_folder(tmp_path):
    out, _, history = run(tmp_path, "frozen-teacher", "--steps", "2", "--log-every", "1", "--eval-every", "2")
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, "frozen-teacher", "--steps", "2")
    assert "holds another run's outputs" in str(stop.value) and "--resume" not in str(stop.value)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


def test_teacher_updates():
    torch.manual_seed(0)
    model = collapse_demo.StudentTeacher(dict(img_size=16, patch_size=4, dim=16, depth=1, heads=2, mlp_dim=32),
                                         32, 8, teacher="copy")
    student = [p.detach().clone() for p in [*model.backbone.parameters(), *model.head.parameters()]]
    teacher = [p.detach().clone() for p in [*model.teacher_backbone.parameters(), *model.teacher_head.parameters()]]
    with torch.no_grad():
        for p in [*model.backbone.parameters(), *model.head.parameters()]:
            p.add_(torch.randn_like(p))
    moved = [p.detach().clone() for p in [*model.backbone.parameters(), *model.head.parameters()]]
    model.update_teacher(0.9)
    for t, t0, s in zip([*model.teacher_backbone.parameters(), *model.teacher_head.parameters()], teacher, moved):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    model.update_teacher(0.0)  # copy-each-epoch: the teacher becomes the student exactly
    for t, s in zip([*model.teacher_backbone.parameters(), *model.teacher_head.parameters()], moved):
        assert torch.equal(t, s)
    assert not any(torch.equal(s, s0) for s, s0 in zip(moved, student))


def test_tied_predictor_is_symmetric_and_steps_like_the_reproductions_averaging():
    torch.manual_seed(0)
    predictor = collapse_demo.SimSiamRegime(16, 8, 16, predictor="symmetric").predictor
    z, target = torch.randn(32, 8), torch.randn(32, 8)
    weight = predictor.tied_weight().detach()
    assert weight.shape == (16, 8)
    # Its linear part W2 W1 = W^T W is symmetric: the second layer is the first one transposed.
    hidden = F.relu(F.batch_norm(z @ weight.T, None, None, training=True))
    torch.testing.assert_close(predictor(z), hidden @ weight)

    # The reproduction: two untied layers, one SGD step each, then both replaced by their average.
    first, second = weight.clone().requires_grad_(), weight.T.clone().requires_grad_()
    prediction = F.relu(F.batch_norm(z @ first.T, None, None, training=True)) @ second.T
    (-F.cosine_similarity(prediction, target).mean()).backward()
    lr = 0.5
    averaged = ((first - lr * first.grad) + (second - lr * second.grad).T) / 2

    optimizer = torch.optim.SGD(predictor.parameters(), lr=lr)
    (-F.cosine_similarity(predictor(z), target).mean()).backward()
    optimizer.step()
    torch.testing.assert_close(predictor.tied_weight().detach(), averaged.detach())
    assert not torch.allclose(averaged, weight)


def test_the_symmetric_pair_trains_with_the_reproductions_recipe(tmp_path):
    """The KTH reproduction's Table 1 recipe: its heads (batch norm without affine, no output batch norm),
    the sum of the two cosines, a constant lr 0.03 at batch 128, weight decay on the weights alone; and
    its measure, the top eigenvalue's share of F-hat, logged at every evaluation."""
    spec = collapse_demo.REGIMES["symmetric-no-ema"]
    args = collapse_demo.get_args([*TINY, *SMALL_HEADS, "--regimes", "symmetric-no-ema"])
    model = collapse_demo.build_model(spec, args)
    stop_grad = collapse_demo.build_model(collapse_demo.REGIMES["stop-grad"], args)
    assert model.loss_weight == 1.0 and stop_grad.loss_weight == 0.5
    assert not any(isinstance(layer, torch.nn.BatchNorm1d) and layer.affine for layer in model.projector)
    assert isinstance(model.projector[-1], torch.nn.Linear)
    weights, biases = collapse_demo.make_optimizer(model, spec, args).param_groups
    assert (weights["weight_decay"], biases["weight_decay"]) == (4e-4, 0.0)
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in biases["params"])
    assert collapse_demo.base_lr(spec, args) == pytest.approx(0.03 * 16 / 128)
    _, _, history = run(tmp_path, "symmetric-no-ema", "--steps", "4", "--eval-every", "2", "--log-every", "2")
    assert [row["lr"] for row in history] == [pytest.approx(0.03 * 16 / 128)] * 2  # held, not decayed
    shares = [row["f_top_share"] for row in history if "knn_top1" in row]
    assert len(shares) == 2 and all(1 / 32 <= share <= 1 for share in shares)
    assert "needs the reproduction's length" in collapse_demo.regime_label("symmetric-no-ema", history)
    assert collapse_demo.regime_label("stop-grad", history) == "stop-grad"


@pytest.mark.parametrize("flags, message", [
    (["--regimes", "stop-grad,no-such-regime"], "unknown no-such-regime"),
    (["--regimes", "ema", "--dim", "30", "--heads", "4"], "multiple of --heads"),
    (["--regimes", "ema", "--img-size", "18", "--patch-size", "4"], "must divide --img-size"),
])
def test_bad_flags_stop_with_one_line(flags, message, capsys):
    with pytest.raises(SystemExit):
        collapse_demo.main(["--dataset", "synthetic", *flags])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error
