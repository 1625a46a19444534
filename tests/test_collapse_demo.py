"""collapse_demo.py: the regimes that must collapse do and those that must not do not, from the same weights
on the same batches; the symmetric predictor steps as the reproduction's averaging of its two layers."""
import json

import pytest
import torch
import torch.nn.functional as F

import collapse_demo
from conftest import TINY, one_line_error

SMALL = ["--dim", "32", "--depth", "1", "--heads", "2", "--mlp-dim", "64", "--head-hidden", "64",
         "--head-dim", "32", "--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "64",
         "--log-every", "1"]

def demo(tmp_path, regimes, *flags):
    argv = [*TINY, *SMALL, "--regimes", regimes, "--out-dir", str(tmp_path / "run"), *flags]
    summary = collapse_demo.main(argv)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return summary, history

def test_without_stop_gradient_simsiam_collapses_and_the_figure_shows_it(tmp_path):
    summary, history = demo(tmp_path, "stop-grad,no-stop-grad", "--steps", "24", "--eval-every", "12",
                            "--lr", "0.8", "--img-size", "8")
    healthy, collapsed = summary["stop-grad"], summary["no-stop-grad"]
    assert collapsed["collapse"] < 0.3 * healthy["collapse"] and collapsed["erank"] < 0.5 * healthy["erank"]
    assert 1 - collapsed["spectrum"][0] < 0.1 * (1 - healthy["spectrum"][0])  # one direction holds the energy
    first = [next(row["loss"] for row in history if row["regime"] == name) for name in summary]
    assert first[0] == pytest.approx(first[1], abs=1e-5)  # the same weights and batches: the same first loss
    assert [row["step"] for row in history if "knn_top1" in row] == [12, 24, 12, 24]
    assert (tmp_path / "run" / "collapse_demo.png").stat().st_size > 10_000

def test_sgd_on_the_teacher_drives_the_loss_to_zero_and_an_ema_teacher_does_not(tmp_path):
    summary, _ = demo(tmp_path, "sgd-both,ema,ema-center-sharpen", "--steps", "30", "--eval-every", "30",
                      "--vit-lr", "0.1")
    assert summary["sgd-both"]["loss"] < 0.1 * summary["ema"]["loss"]  # teacher and student agree on a class
    assert sum(summary["sgd-both"]["spectrum"][2:]) < 1e-3  # or two: two directions at most
    assert sum(summary["ema-center-sharpen"]["spectrum"][2:]) > 1e-3

def test_the_tied_predictor_steps_like_the_reproductions_averaging_of_its_two_layers():
    torch.manual_seed(0)
    predictor = collapse_demo.TiedPredictor(8, 16)
    z, target = torch.randn(32, 8), torch.randn(32, 8)
    weight = predictor.tied_weight().detach()
    first, second = weight.clone().requires_grad_(), weight.T.clone().requires_grad_()  # untied
    prediction = F.relu(F.batch_norm(z @ first.T, None, None, training=True)) @ second.T
    torch.testing.assert_close(predictor(z), prediction)  # W2 W1 = W^T W: symmetric
    (-F.cosine_similarity(prediction, target).mean()).backward()
    averaged = ((first - 0.5 * first.grad) + (second - 0.5 * second.grad).T) / 2
    optimizer = torch.optim.SGD(predictor.parameters(), lr=0.5)
    (-F.cosine_similarity(predictor(z), target).mean()).backward()
    optimizer.step()
    torch.testing.assert_close(predictor.tied_weight().detach(), averaged.detach())

def test_bad_regimes_and_an_existing_folder_are_one_line_errors(tmp_path):
    assert "--regimes" in one_line_error(collapse_demo.main, [*TINY, "--regimes", "stop-grad,nothing"])
    bad_patch = [*TINY, "--regimes", "ema", "--patch-size", "5"]
    assert "--patch-size" in one_line_error(collapse_demo.main, bad_patch)
    demo(tmp_path, "frozen-teacher", "--steps", "2")
    assert "exists" in one_line_error(collapse_demo.main, [*TINY, "--out-dir", str(tmp_path / "run")])
