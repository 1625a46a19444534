"""Whole runs, in-process and as commands: the run folder and its files, exact resume, the datasets, collapse
that shows in the log, and a one-line error (nothing lost) for every bad input a researcher makes."""
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import byol
import collapse_demo
import dino_vit
import linear_eval
import simsiam
import spectrum
from conftest import SMALL, TINY, jpeg_folder, load, one_line_error

def run(script, folder, *flags):
    return script.main([*TINY, *SMALL[script.SCRIPT], "--out-dir", str(folder), *flags])

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A byol.py run of two epochs, and its history."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    return folder, run(byol, folder, "--epochs", "2")

def test_a_run_writes_its_checkpoint_metrics_and_figure(finished, capsys):
    folder, history = finished
    assert [row["epoch"] for row in history] == [1, 2] and history[0]["loss"] != history[1]["loss"]
    assert all(0 <= row["knn_top1"] <= 1 and 0 < row["collapse"] <= 1 <= row["erank"] for row in history)
    assert [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()] == history
    checkpoint = load(folder / "checkpoint.pt")  # weights_only: plain types alone
    assert checkpoint["step"] == 8 and checkpoint["args"]["epochs"] == 2 and checkpoint["data"]["train"] == 64
    byol.BYOL(16, 64, 32, 64).load_state_dict(checkpoint["model"])  # strictly
    assert (folder / "byol.png").stat().st_size > 10_000

def test_progress_lines_show_loss_collapse_knn_speed_and_eta(tmp_path, capsys):
    run(byol, tmp_path / "run", "--epochs", "1", "--log-every", "1")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert [line.split(" | ")[0] for line in lines] == [f"epoch 1/1 step {step}/4" for step in range(1, 5)]
    for word in ("loss", "collapse", "images_per_s", "eta"):
        assert all(f"| {word} " in line for line in lines), word
    assert "| knn_top1 " in lines[-1] and "| erank " in lines[-1] and "| knn_top1 " not in lines[-2]

@pytest.mark.parametrize("stop", [3, 6])  # 4 steps an epoch: stopped inside the first and the second
def test_a_run_stopped_at_any_step_resumes_to_the_weights_of_the_uninterrupted_run(stop, finished, tmp_path):
    """Resumed in this process, and in a fresh one: every random draw follows from (seed, step)."""
    straight = load(finished[0] / "checkpoint.pt")
    run(byol, tmp_path / "run", "--epochs", "2", "--max-steps", str(stop), "--eval-every", "9")
    assert load(tmp_path / "run" / "checkpoint.pt")["step"] == stop
    resume = ["--resume", str(tmp_path / "run" / "checkpoint.pt")]
    if stop == 3:
        byol.main(resume)
    else:
        subprocess.run([sys.executable, byol.__file__, *resume], check=True, capture_output=True)
    resumed = load(tmp_path / "run" / "checkpoint.pt")
    assert resumed["step"] == 8 and [row["epoch"] for row in resumed["history"]] == [1, 2]
    assert all(torch.equal(straight["model"][name], tensor) for name, tensor in resumed["model"].items())
    for index, state in straight["optimizer"]["state"].items():  # the SGD momentum too
        assert torch.equal(state["momentum_buffer"], resumed["optimizer"]["state"][index]["momentum_buffer"])

def test_a_resumed_run_takes_again_only_the_flags_that_may_change(finished, tmp_path):
    shutil.copytree(finished[0], tmp_path / "run")  # the shared run stays as it finished
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    assert "--lr" in one_line_error(byol.main, ["--resume", checkpoint, "--lr", "0.5"])
    history = byol.main(["--resume", checkpoint, "--epochs", "3", "--max-steps", "9", "--dtype", "bfloat16"])
    assert history[-1]["step"] == 9 and load(checkpoint)["args"]["epochs"] == 3
    assert load(checkpoint)["args"]["dtype"] == "bfloat16"  # the switch to try when a loss turns NaN

def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls, real = [], simsiam.negative_cosine

    def breaking(prediction, target):  # from step 6 on, two calls a step
        calls.append(1)
        return real(prediction, target) * (math.nan if len(calls) > 10 else 1.0)

    monkeypatch.setattr(simsiam, "negative_cosine", breaking)
    message = one_line_error(simsiam.main, [*TINY, *SMALL["simsiam"], "--epochs", "3", "--out-dir",
                                            str(tmp_path / "r")])
    assert "loss is nan at step 6" in message and "last good" in message and "--dtype float32" in message
    assert load(tmp_path / "r" / "checkpoint.pt")["step"] == 4

@pytest.mark.parametrize("flags", [["--lr", "nan"], ["--batch-size", "1"], ["--momentum", "1"],
                                   ["--dataset", "imagenet"], ["--no-such-flag"], ["--weight-decay=inf"]])
def test_a_wrong_flag_is_a_usage_error(flags, capsys):
    with pytest.raises(SystemExit) as stop:
        byol.main(flags)
    assert stop.value.code == 2 and "error: " in capsys.readouterr().err

def test_bad_files_and_folders_are_one_line_errors_that_lose_nothing(finished, tmp_path):
    folder = finished[0]
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    assert "exists" in one_line_error(byol.main, [*TINY, "--out-dir", str(folder)])
    assert "cannot read checkpoint" in one_line_error(byol.main, ["--resume", str(tmp_path / "none.pt")])
    for name, data in (("cut.pt", before["checkpoint.pt"][:100_000]), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(data)
        assert "cannot read checkpoint" in one_line_error(byol.main, ["--resume", str(tmp_path / name)])
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    assert "another program" in one_line_error(byol.main, ["--resume", str(tmp_path / "foreign.pt")])
    assert "written by byol" in one_line_error(simsiam.main, ["--resume", str(folder / "checkpoint.pt")])
    older = load(folder / "checkpoint.pt")  # as byol.py wrote it before its target became one module
    older["model"] = {name.replace("target.0.", "target_backbone."): w for name, w in older["model"].items()}
    torch.save(older, tmp_path / "older.pt")
    assert "do not fit byol.py" in one_line_error(byol.main, ["--resume", str(tmp_path / "older.pt")])
    (tmp_path / "a file").write_text("")
    assert "cannot create" in one_line_error(byol.main, [*TINY, "--out-dir", str(tmp_path / "a file" / "x")])
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before

def test_an_unlabelled_folders_stand_in_test_split_spreads_over_all_its_images(tmp_path, monkeypatch):
    for index in range(4001):
        (tmp_path / f"{index:04d}.png").touch()

    def decode(sample, size):  # an image whose pixels say which file it came from
        return torch.full((3, size, size), int(sample[0].stem) % 251, dtype=torch.uint8)

    monkeypatch.setattr(byol, "decode", decode)
    args = byol.parse_args(["--dataset", "folder", "--data-dir", str(tmp_path), "--img-size", "8"])[0]
    data = byol.load_data(args, torch.device("cpu"))
    assert len(data["train_x"]) == 4001 and len(data["test_x"]) == 1334  # every third image: 0, 3, ..., 3999
    assert data["test_x"][-1, 0, 0, 0] == 3999 % 251

def test_a_folder_of_images_trains_and_its_mistakes_are_one_line_errors(tmp_path):
    root = jpeg_folder(tmp_path / "images")
    flags = ["--dataset", "folder", "--img-size", "16", "--batch-size", "8", "--device", "cpu",
             *SMALL["byol"]]
    history = byol.main([*flags, "--data-dir", str(root), "--epochs", "2", "--max-steps", "2", "--out-dir",
                         str(tmp_path / "run")])
    assert math.isfinite(history[0]["loss"])
    assert load(tmp_path / "run" / "checkpoint.pt")["data"]["classes"] == ["cat", "dog"]
    other = jpeg_folder(tmp_path / "other", classes=("cat", "dog", "emu"))
    resume = ["--resume", str(tmp_path / "run" / "checkpoint.pt")]
    assert "holds other images" in one_line_error(byol.main, [*resume, "--data-dir", str(other)])
    root = root.rename(tmp_path / "moved")
    assert byol.main([*resume, "--data-dir", str(root)])[-1]["step"] == 4  # the same images, moved
    assert "no images under" in one_line_error(byol.main, [*flags, "--data-dir", str(tmp_path / "none")])
    (root / "test" / "bird").mkdir()
    (root / "test" / "bird" / "0.jpg").write_bytes((root / "test" / "cat" / "0.jpg").read_bytes())
    assert "different class folders" in one_line_error(byol.main, [*flags, "--data-dir", str(root)])
    (root / "train" / "bird").mkdir()
    (root / "train" / "bird" / "x.jpg").write_bytes(b"not a jpeg")
    message = one_line_error(byol.main, [*flags, "--data-dir", str(root)])
    assert "cannot identify image file" in message and "x.jpg" in message

def test_a_folder_without_labels_trains_with_the_collapse_measures_and_no_knn(tmp_path, capsys):
    """Every image under DIR, at any depth, when DIR has no train/ and test/ class folders."""
    jpeg_folder(tmp_path / "photos" / "holiday")
    history = byol.main(["--dataset", "folder", "--data-dir", str(tmp_path / "photos"), "--img-size", "16",
                         "--batch-size", "8", "--device", "cpu", *SMALL["byol"], "--epochs", "1", "--out-dir",
                         str(tmp_path / "run")])
    assert "no labels: no kNN monitor" in capsys.readouterr().out
    assert "knn_top1" not in history[-1] and history[-1]["erank"] > 1 and history[-1]["collapse"] > 0
    checkpoint = str(tmp_path / "run" / "checkpoint.pt")
    assert load(checkpoint)["data"]["train"] == 32
    assert "needs labels" in one_line_error(linear_eval.main, [checkpoint, "--device", "cpu"])
    demo = ["--dataset", "folder", "--data-dir", str(tmp_path / "photos"), "--batch-size", "8"]
    assert "needs labelled images" in one_line_error(collapse_demo.main, demo)
    report = spectrum.main([checkpoint, "--out", str(tmp_path / "s"), "--device", "cpu"])["checkpoints"][0]
    assert report["projector"]["erank"] == pytest.approx(history[-1]["erank"], rel=1e-4)

def test_stl10_trains_on_its_unlabelled_images_and_monitors_on_its_labelled_ones(tmp_path, monkeypatch):
    """A fake STL-10 in torchvision's binary format (its checksums skipped), 96 px: the ImageNet stem."""
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for split, count in (("train", 24), ("unlabeled", 40), ("test", 16)):
        pixels = np.random.default_rng(0).integers(0, 256, (count, 3, 96, 96), dtype=np.uint8)
        pixels.tofile(folder / f"{split}_X.bin")
        if split != "unlabeled":
            (np.arange(count) % 10 + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"class{c}" for c in range(10)))
    args = byol.parse_args(["--dataset", "stl10", "--data-dir", str(tmp_path), "--batch-size", "16"])[0]
    data = byol.load_data(args, torch.device("cpu"))
    assert args.img_size == 96 and len(data["train_x"]) == 64 and len(data["labelled_x"]) == 24
    history = byol.main(["--dataset", "stl10", "--data-dir", str(tmp_path), "--batch-size", "16",
                         "--device", "cpu", *SMALL["byol"], "--img-size", "96", "--max-steps", "1",
                         "--out-dir", str(tmp_path / "r")])
    assert 0 <= history[0]["knn_top1"] <= 1
    assert load(tmp_path / "r" / "checkpoint.pt")["model"]["backbone.conv1.weight"].shape == (64, 3, 7, 7)

def test_without_stop_gradient_simsiam_collapses_where_it_does_not_with_it(tmp_path):
    """Sec. 4.1, Fig. 2: at a high, nearly constant learning rate the collapse shows within 16 steps without
    stop-gradient, in front of the output batch norm and along the main axis; with it the embedding stays
    spread."""
    flags = ["--lr", "2", "--epochs", "100", "--max-steps", "16", "--proj-hidden", "256", "--proj-dim", "256",
             "--pred-hidden", "64", "--eval-every", "9", "--img-size", "8"]
    default = simsiam.main([*TINY, *flags, "--out-dir", str(tmp_path / "default")])[-1]
    collapsed = simsiam.main([*TINY, *flags, "--no-stop-grad", "--out-dir", str(tmp_path / "collapsed")])[-1]
    assert collapsed["loss"] < default["loss"] - 0.2  # these margins hold on seeds 0, 1 and 2
    assert collapsed["collapse_pre_bn"] < default["collapse_pre_bn"] - 0.02
    assert collapsed["off_axis"] < 0.8 * default["off_axis"] and collapsed["erank"] < 0.6 * default["erank"]

def test_dinos_two_collapses_show_in_the_teachers_entropy(tmp_path):
    """Sec. 5.3: without sharpening the teacher's output goes uniform (entropy near log K), without centring
    one prototype takes it (entropy near 0); with both it stays in between."""
    flags = ["--epochs", "4", "--warmup-epochs", "0", "--lr", "0.02", "--ema-start", "0.9",
             "--eval-every", "4"]
    entropy, kl = {}, {}
    for ablation in ("", "--no-sharpening", "--no-centering"):
        history = run(dino_vit, tmp_path / f"run{ablation}", *flags, *[ablation] * bool(ablation))
        entropy[ablation] = history[-1]["teacher_entropy"] / math.log(64)
        kl[ablation] = history[-1]["kl_teacher_center"]  # image-prototype information: 0 in both collapses
        assert (tmp_path / f"run{ablation}" / "attention.png").stat().st_size > 10_000  # its maps, per head
    assert entropy["--no-sharpening"] > 0.9 and 0.1 < entropy[""] < 0.6 and entropy["--no-centering"] < 0.05
    assert kl[""] > 0.2 and kl["--no-sharpening"] < 0.02 and kl["--no-centering"] < 0.02
