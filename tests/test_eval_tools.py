"""linear_eval.py and spectrum.py on checkpoints that tiny CPU runs of the training scripts write:
a ResNet-18 one (byol.py), a ViT one (dino_vit.py), and one whose backbone features are forced to
rank 1, which both tools must report as collapsed (effective rank 1, chance accuracy)."""
import ast
import shutil
from pathlib import Path

import pytest
import torch

import byol
import dino_vit
import directcopy
import directpred
import linear_eval
import spectrum
from conftest import TINY, load

NUM_CLASSES = 10  # of the synthetic dataset, whose 500 test images are balanced
SMALL_HEADS = ["--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "64"]
SMALL_VIT = ["--patch-size", "4", "--dim", "32", "--depth", "2", "--heads", "2", "--mlp-dim", "64",
             "--head-hidden", "64", "--bottleneck-dim", "16", "--out-dim", "64", "--local-crops", "2"]
# The training runs' 64-image subset (same seed, same images) as the kNN memory bank and the
# linear classifier's training set, so the tools' kNN must equal the training runs' own monitor.
EVAL = ["--subset", "64", "--batch-size", "16", "--device", "cpu"]
OUT_FLAG = {linear_eval: "--out-dir", spectrum: "--out"}


@pytest.fixture(scope="module")
def byol_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("byol")
    history = byol.main([*TINY, *SMALL_HEADS, "--epochs", "1", "--out-dir", str(out)])
    return out / "checkpoint.pt", history[-1]


@pytest.fixture(scope="module")
def dino_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dino")
    history = dino_vit.main([*TINY, *SMALL_VIT, "--epochs", "1", "--out-dir", str(out)])
    return out / "checkpoint.pt", history[-1]


@pytest.fixture(scope="module")
def rank1_checkpoint(byol_run, tmp_path_factory):
    """The byol checkpoint with one and the same backbone feature for every image: the first block
    of the last stage ends in two zeroed batch norms, so the second block's shortcut carries 0, and
    that block's residual branch ends in a batch norm of weight 0: avgpool returns relu(its bias)."""
    checkpoint = load(byol_run[0])
    model = checkpoint["model"]
    for bn in ("backbone.layer4.0.bn2", "backbone.layer4.0.downsample.1"):
        model[f"{bn}.weight"].zero_()
        model[f"{bn}.bias"].zero_()
    model["backbone.layer4.1.bn2.weight"].zero_()
    model["backbone.layer4.1.bn2.bias"].copy_(torch.linspace(0.5, 1.5, 512))
    path = tmp_path_factory.mktemp("rank1") / "checkpoint.pt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("run, feature_dim, projector_dim, min_top1", [
    ("byol_run", 512, 32, 0.4), ("dino_run", 32, 16, 0.2)])
def test_both_tools_on_checkpoints_of_two_scripts(run, feature_dim, projector_dim, min_top1, request, tmp_path):
    checkpoint, trained = request.getfixturevalue(run)
    result = linear_eval.main([str(checkpoint), "--epochs", "10", "--out-dir", str(tmp_path), *EVAL])
    assert result["feature_dim"] == feature_dim and (result["num_train"], result["num_test"]) == (64, 500)
    # Same features, k, temperature and memory bank as the training run's kNN monitor (k=20 in
    # TINY): the backbone was rebuilt, loaded exactly, and runs in eval mode.
    assert result["knn_top1_k20"] == trained["knn_top1"]
    assert result["linear_top1"] > min_top1 > 1 / NUM_CLASSES  # chance is 0.1
    assert result["linear_top5"] >= result["linear_top1"]
    assert result["linear_top1"] == result["history"][-1]["test_top1"]  # the last epoch, not the best
    assert len(result["history"]) == 10 and result["history"][-1]["loss"] < result["history"][0]["loss"]
    assert sorted(result["per_class_top1"]) == [f"class{c}" for c in range(NUM_CLASSES)]
    name = "linear_eval-subset64-epochs10-batch-size16"  # the settings that differ from the protocol's
    assert (tmp_path / f"{name}.json").exists() and (tmp_path / f"{name}.png").exists()

    report = spectrum.main([str(checkpoint), "--out", str(tmp_path / "spectrum"), "--device", "cpu"])["checkpoints"][0]
    assert (report["backbone"]["dim"], report["projector"]["dim"]) == (feature_dim, projector_dim)
    # The projector's effective rank is the training run's erank metric of the same embedding.
    assert report["projector"]["erank"] == pytest.approx(trained["erank"], rel=1e-5)
    for level in ("backbone", "projector"):
        eigenvalues = report[level]["eigenvalues"]
        assert len(eigenvalues) == report[level]["dim"] and eigenvalues == sorted(eigenvalues, reverse=True)
        assert report[level]["erank"] > 2 and report[level]["collapse"] > 0.05 and eigenvalues[0] > 1e-3
    assert (tmp_path / "spectrum.json").exists() and (tmp_path / "spectrum.png").exists()


def test_spectrum_reports_rank1_features_as_collapsed(byol_run, rank1_checkpoint, tmp_path):
    out = tmp_path / "both"
    healthy, collapsed = spectrum.main([str(byol_run[0]), str(rank1_checkpoint), "--out", str(out),
                                        "--device", "cpu"])["checkpoints"]
    assert healthy["backbone"]["erank"] > 10
    for level in ("backbone", "projector"):
        assert collapsed[level]["erank"] == pytest.approx(1, abs=1e-3)
        assert collapsed[level]["collapse"] < 1e-3
        assert max(collapsed[level]["eigenvalues"]) < 1e-9  # one point: no variance in any direction
    assert Path(f"{out}.json").exists() and Path(f"{out}.png").exists()


def test_linear_eval_caches_features_by_checkpoint_hash_and_finds_rank1_at_chance(
        byol_run, rank1_checkpoint, tmp_path, capsys, monkeypatch):
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.parent.mkdir()
    shutil.copy(byol_run[0], checkpoint)
    healthy = linear_eval.main([str(checkpoint), "--epochs", "3", *EVAL])
    assert "features from" not in capsys.readouterr().out and not healthy["features_from_cache"]
    with monkeypatch.context() as patch:  # with cached features no image is read
        patch.setattr(linear_eval, "load_dataset", lambda source: pytest.fail("images read despite the cache"))
        again = linear_eval.main([str(checkpoint), "--epochs", "3", *EVAL])
    assert "features from" in capsys.readouterr().out and again["features_from_cache"]
    assert again["history"] == healthy["history"]  # cached features and the same seed: the same run

    # The same path, other weights: the cache key (the file's hash) changes, the features are recomputed.
    shutil.copy(rank1_checkpoint, checkpoint)
    collapsed = linear_eval.main([str(checkpoint), "--epochs", "3", *EVAL])
    assert "features from" not in capsys.readouterr().out
    assert len(list(checkpoint.parent.glob("features-*.pt"))) == 2
    # Identical features: every test image gets the same prediction; the test set is balanced.
    for key in ("linear_top1", "knn_top1_k20", "knn_top1_k200"):
        assert collapsed[key] == pytest.approx(1 / NUM_CLASSES, abs=1e-6), key
    assert healthy["linear_top1"] > 0.3


def test_linear_eval_with_augmentation_recomputes_features(byol_run, tmp_path):
    plain = linear_eval.main([str(byol_run[0]), "--epochs", "10", "--out-dir", str(tmp_path), *EVAL])
    augmented = linear_eval.main([str(byol_run[0]), "--aug", "--epochs", "10", "--out-dir", str(tmp_path), *EVAL])
    assert augmented["protocol"]["aug"] and not plain["protocol"]["aug"]
    assert augmented["history"][0]["loss"] != plain["history"][0]["loss"]
    assert augmented["knn_top1_k20"] == plain["knn_top1_k20"]  # kNN always on un-augmented features
    assert augmented["linear_top1"] > 1 / NUM_CLASSES + 0.1


@pytest.fixture(scope="module")
def predictor_runs(tmp_path_factory):
    """directpred.py and directcopy.py (W_p set from F-hat), and the SGD baseline with a trained
    W_p, plain and with its symmetric part applied."""
    runs = {}
    for name, script, flags in [("directpred", directpred, []), ("directcopy", directcopy, []),
                                ("sgd", directpred, ["--predictor", "sgd"]),
                                ("sgd_symmetric", directpred, ["--predictor", "sgd", "--symmetric"])]:
        out = tmp_path_factory.mktemp(name)
        script.main([*TINY, "--proj-hidden", "64", "--proj-dim", "16", "--epochs", "1", "--max-steps", "3",
                     "--out-dir", str(out), *flags])
        runs[name] = out / "checkpoint.pt"
    return runs


def test_spectrum_analyses_linear_predictors(predictor_runs, byol_run, tmp_path):
    out = tmp_path / "predictors"
    reports = spectrum.main([*map(str, predictor_runs.values()), str(byol_run[0]), "--out", str(out),
                             "--device", "cpu"])["checkpoints"]
    assert "predictor" not in reports[-1]  # byol.py's predictor is an MLP
    predictors = dict(zip(predictor_runs, (report["predictor"] for report in reports)))
    for name, report in predictors.items():
        logged = load(predictor_runs[name])["history"][-1]  # the training run's own end-of-run statistics
        assert [entry["epoch"] for entry in report["history"]] == [1]
        for key in ("F_eigenvalues", "predictor_eigenvalues", "alignment"):
            assert len(report[key]) == 16
            assert report[key] == pytest.approx(logged[key], abs=1e-6), (name, key)
            assert report["history"][-1][key] == logged[key]
        assert report["asymmetry"] == pytest.approx(logged["asymmetry"], abs=1e-6)
        # Over training, the smallest eigenvalue of the symmetric part is known for a symmetric W_p only.
        if name == "sgd":
            assert report["history"][-1]["sym_min_eigenvalue"] is None
        else:
            assert report["history"][-1]["sym_min_eigenvalue"] == pytest.approx(report["sym_min_eigenvalue"], abs=1e-6)
    # W_p set from F-hat at every step shares its eigenvectors and is symmetric (Tian et al. Eq. 18,
    # DirectCopy's F / |F| + eps I); DirectPred's eigenvalues are at least eps = 0.1.
    for name in ("directpred", "directcopy", "sgd_symmetric"):
        assert predictors[name]["asymmetry"] < 1e-6, name
    for name in ("directpred", "directcopy"):
        assert predictors[name]["alignment"] == pytest.approx([1.0] * 16, abs=1e-4), name
    assert predictors["directpred"]["sym_min_eigenvalue"] > 0.1 - 1e-4
    # A trained W_p from a random start is neither symmetric nor aligned after 3 steps.
    assert predictors["sgd"]["asymmetry"] > 0.1 and min(predictors["sgd"]["alignment"]) < 0.9
    weight = load(predictor_runs["sgd"])["model"]["predictor.weight"].double()
    expected = torch.linalg.eigvalsh((weight + weight.T) / 2)[0].item()
    assert predictors["sgd"]["sym_min_eigenvalue"] == pytest.approx(expected)
    assert Path(f"{out}-predictor.png").exists()


# --- the copies of the training scripts' code -----------------------------------------------------
def top_level_definitions(path):
    source = path.read_text()
    return {node.name: ast.get_source_segment(source, node) for node in ast.parse(source).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("tool", [linear_eval, spectrum], ids=["linear_eval", "spectrum"])
def test_tools_copy_the_training_scripts_code_verbatim(tool):
    """Data pipeline, backbones and metrics are copies, so the tools read the same images, rebuild
    the same networks and measure what the training runs logged; only these four differ on purpose."""
    own = top_level_definitions(Path(tool.__file__))
    for script in (byol, dino_vit, directpred, directcopy):
        theirs = top_level_definitions(Path(script.__file__))
        shared = set(own) & set(theirs) - {"get_args", "prepare_data", "load_checkpoint", "main"}
        assert {"load_dataset", "ViT" if script is dino_vit else "resnet18_backbone"} <= shared
        assert not [name for name in shared if own[name] != theirs[name]], script.__name__


# --- bad input: a one-line error, nothing written -------------------------------------------------
def truncated(checkpoint, tmp_path):
    path = tmp_path / "truncated.pt"
    path.write_bytes(checkpoint.read_bytes()[:100_000])
    return path


def unknown_arch(checkpoint, tmp_path):
    saved = load(checkpoint)
    saved["arch"]["backbone"] = "resnet50_imagenet"
    path = tmp_path / "unknown_arch.pt"
    torch.save(saved, path)
    return path


def wrong_weights(checkpoint, tmp_path):
    saved = load(checkpoint)
    del saved["model"]["backbone.layer4.1.bn2.weight"]
    path = tmp_path / "wrong_weights.pt"
    torch.save(saved, path)
    return path


def other_program(checkpoint, tmp_path):
    path = tmp_path / "other_program.pt"
    torch.save({"epoch": 3, "state_dict": byol.resnet18_backbone().state_dict()}, path)
    return path


def not_a_checkpoint(checkpoint, tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint\n")
    return path


def missing(checkpoint, tmp_path):
    return tmp_path / "missing.pt"


@pytest.mark.parametrize("tool", [linear_eval, spectrum], ids=["linear_eval", "spectrum"])
@pytest.mark.parametrize("bad_file, says", [
    (missing, "no checkpoint at"), (truncated, "truncated"), (not_a_checkpoint, "truncated or not a checkpoint"),
    (other_program, "not a checkpoint of a training script"), (unknown_arch, "'resnet50_imagenet'"),
    (wrong_weights, "do not fit")])
def test_bad_file_gives_one_line_error(tool, bad_file, says, byol_run, tmp_path):
    path = bad_file(byol_run[0], tmp_path)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(SystemExit) as error:
        tool.main([str(path), OUT_FLAG[tool], str(tmp_path / "out"), "--device", "cpu"])
    message = str(error.value.code)
    assert message.startswith(f"{tool.__name__}.py: error: ") and "\n" not in message and says in message
    assert sorted(tmp_path.iterdir()) == before  # nothing written, nothing removed
