"""linear_eval.py, spectrum.py and the README's backbone lines on the checkpoints of tiny runs: a ResNet-18
one, a ViT one, DirectPred's linear predictors, and one whose backbone maps every image to one point, which
both tools report collapsed."""
import re

import pytest
import torch

import byol
import dino_vit
import directcopy
import directpred
import linear_eval
import spectrum
from conftest import ROOT, SMALL, TINY, load, one_line_error

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The checkpoints of one-epoch runs, with the last row of their history."""
    made = {}
    scripts = dict(byol=byol, dino_vit=dino_vit, directcopy=directcopy, directpred=directpred, sgd=directpred)
    for name, script in scripts.items():
        flags = ["--predictor", "sgd"] if name == "sgd" else []
        folder = tmp_path_factory.mktemp(name) / "run"
        history = script.main([*TINY, *SMALL[script.SCRIPT], *flags, "--epochs", "1", "--out-dir",
                               str(folder)])
        made[name] = folder / "checkpoint.pt", history[-1]
    return made

@pytest.fixture(scope="module")
def one_point(runs, tmp_path_factory):
    """byol's checkpoint with every image mapped to one backbone feature: the last block's residual branch
    ends in a batch norm of weight 0, and the shortcut into it carries 0, so the pooled output is relu(that
    norm's bias)."""
    checkpoint = load(runs["byol"][0])
    for norm in ("layer4.0.bn2", "layer4.0.downsample.1", "layer4.1.bn2"):
        for key in (f"backbone.{norm}.weight", f"backbone.{norm}.bias"):
            checkpoint["model"][key].zero_()
    checkpoint["model"]["backbone.layer4.1.bn2.bias"].copy_(torch.linspace(0.5, 1.5, 512))
    path = tmp_path_factory.mktemp("one_point") / "checkpoint.pt"
    torch.save(checkpoint, path)
    return path

@pytest.mark.parametrize("name, dims", [("byol", (512, 32)), ("dino_vit", (32, 16))])
def test_both_tools_read_the_checkpoints_of_a_resnet_and_a_vit(name, dims, runs, tmp_path):
    checkpoint, trained = runs[name]
    result = linear_eval.main([str(checkpoint), "--subset", "64", "--epochs", "10", "--batch-size", "16",
                               "--device", "cpu", "--out-dir", str(tmp_path)])
    # The same backbone, rebuilt and loaded exactly, on the run's 64 images: the training run's kNN monitor
    assert result["feature_dim"] == dims[0] and result["knn_top1_k200"] == trained["knn_top1"]
    assert result["linear_top1"] > 0.3 and result["linear_top1"] == result["history"][-1]["top1"]  # the last
    assert (tmp_path / "linear_eval.json").exists() and (tmp_path / "linear_eval.png").exists()
    report = spectrum.main([str(checkpoint), "--out", str(tmp_path / "s"), "--device", "cpu"])
    report = report["checkpoints"][0]
    assert (report["backbone"]["dim"], report["projector"]["dim"]) == dims
    assert report["projector"]["erank"] == pytest.approx(trained["erank"], rel=1e-4)
    eigenvalues = report["projector"]["eigenvalues"]
    assert eigenvalues == sorted(eigenvalues, reverse=True) and eigenvalues[0] > 1e-3

def test_a_backbone_that_maps_every_image_to_one_point_is_reported_collapsed(runs, one_point, tmp_path):
    healthy, collapsed = spectrum.main([str(runs["byol"][0]), str(one_point), "--out", str(tmp_path / "both"),
                                        "--device", "cpu"])["checkpoints"]
    assert healthy["backbone"]["erank"] > 10
    for level in ("backbone", "projector"):
        assert collapsed[level]["erank"] == pytest.approx(1, abs=1e-3) and collapsed[level]["collapse"] < 1e-3
        assert max(collapsed[level]["eigenvalues"]) < 1e-9  # one point: no variance in any direction
    result = linear_eval.main([str(one_point), "--epochs", "3", "--device", "cpu", "--out-dir",
                               str(tmp_path)])
    for key in ("linear_top1", "knn_top1_k20", "knn_top1_k200"):  # one prediction for all: chance, 10%
        assert result[key] == pytest.approx(0.1, abs=1e-6), key

def test_spectrum_checks_directpreds_assumptions_on_the_linear_predictors(runs, tmp_path):
    names = ("directpred", "directcopy", "sgd")
    paths = [str(runs[name][0]) for name in names]
    reports = spectrum.main([*paths, "--out", str(tmp_path / "p"), "--device", "cpu"])
    predictors = dict(zip(names, (report["predictor"] for report in reports["checkpoints"])))
    for name, report in predictors.items():
        logged = runs[name][1]  # the training run's own statistics at its end
        for key in ("F_eigenvalues", "predictor_eigenvalues", "alignment"):
            assert report[key] == pytest.approx(logged[key], abs=1e-6)
            assert report["history"][-1][key] == logged[key]
    for name in ("directpred", "directcopy"):  # W_p shares F-hat's eigenvectors: aligned and symmetric
        assert predictors[name]["asymmetry"] < 1e-6
        assert predictors[name]["alignment"] == pytest.approx([1] * 32, abs=1e-4)
    assert predictors["directpred"]["sym_min_eigenvalue"] > 0.01 - 1e-4  # every eigenvalue at least eps
    assert predictors["sgd"]["asymmetry"] > 0.1 and min(predictors["sgd"]["alignment"]) < 0.9  # a trained W_p
    assert (tmp_path / "p-predictor.png").exists()

@pytest.mark.parametrize("tool, out", [(linear_eval, "--out-dir"), (spectrum, "--out")])
def test_a_bad_file_is_a_one_line_error(tool, out, runs, tmp_path):
    good = runs["byol"][0]
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:100_000])
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"epoch": 3, "state_dict": {}}, tmp_path / "foreign.pt")
    wrong = load(good)
    del wrong["model"]["backbone.layer4.1.bn2.weight"]
    torch.save(wrong, tmp_path / "wrong.pt")
    for name, says in [("none.pt", "cannot read"), ("cut.pt", "cannot read"), ("empty.pt", "cannot read"),
                       ("foreign.pt", "not a checkpoint"), ("wrong.pt", "do not fit")]:
        assert says in one_line_error(tool.main, [str(tmp_path / name), out, str(tmp_path / "out"),
                                                  "--device", "cpu"])
    datasets = next(action.choices for action in byol.build_parser()._actions if action.dest == "dataset")
    assert list(linear_eval.DATASETS) == datasets  # --dataset takes what the scripts take, and nothing else
    assert not (tmp_path / "out").exists()

def test_the_readmes_lines_load_a_trained_backbone_into_torchvisions_resnet18_and_the_vit(runs):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Use the backbone you trained"):]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)[:2]
    assert len(blocks) == 2
    for code, script in zip(blocks, (byol, dino_vit)):
        path, namespace = runs[script.SCRIPT][0], {}
        exec(code.replace(f"runs/{script.SCRIPT}-<time>/checkpoint.pt", str(path)), namespace)
        model = script.build_model(script.parse_args([*TINY, *SMALL[script.SCRIPT]])[0]).eval()
        model.load_state_dict(load(path)["model"])
        expected = script.networks(model)[0](namespace["normalised"])
        torch.testing.assert_close(namespace["features"], expected)
