"""No run is ever lost or silently mixed: run folders, resume traps, non-finite weights, a full disk and
the one-line errors of the shared plumbing. It is the same code in every training script
(tests/test_shared.py), so byol.py stands for all of them."""
import errno
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import byol
import linear_eval
import spectrum
from conftest import TINY, load, write_jpeg_folder

SMALL_HEADS = ["--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "64"]


def run(out, *flags):
    return byol.main([*TINY, *SMALL_HEADS, "--out-dir", str(out), *flags])


def one_line_error(argv):
    with pytest.raises(SystemExit) as stop:
        byol.main(argv)
    message = str(stop.value)
    assert message.startswith("byol.py: error:") and "\n" not in message
    return message


def snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run: its folder and the bytes of its outputs."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(out, "--epochs", "1")
    return out, snapshot(out)


# --- 1. run folders -------------------------------------------------------------------------------
def test_a_new_run_refuses_a_folder_holding_another_runs_outputs(finished):
    out, before = finished
    message = one_line_error([*TINY, *SMALL_HEADS, "--out-dir", str(out), "--epochs", "1"])
    assert "holds another run's outputs" in message and f"--resume {out / 'checkpoint.pt'}" in message
    assert snapshot(out) == before


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(byol.time, "strftime", lambda pattern: "20260101-000000")
    for _ in range(2):
        byol.main([*TINY, *SMALL_HEADS, "--epochs", "1", "--max-steps", "1"])
    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == ["byol-20260101-000000",
                                                                          "byol-20260101-000000-2"]


def test_a_folder_in_use_by_another_process_is_refused(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print(flush=True); time.sleep(60)",
                               str(out)], stdout=subprocess.PIPE)
    try:
        holder.stdout.readline()  # the other process holds the lock
        message = one_line_error([*TINY, *SMALL_HEADS, "--out-dir", str(out), "--epochs", "1"])
        assert "another process is writing to" in message
    finally:
        holder.kill()
        holder.wait()
    assert list(out.iterdir()) == []
    run(out, "--epochs", "1", "--max-steps", "1")  # once it is gone, the folder is free: the lock died with it
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # and the finished run released it
    os.close(fd)


def test_stale_temporary_files_are_removed_at_start(finished, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    for name, data in finished[1].items():
        (out / name).write_bytes(data)
    (out / "checkpoint.pt.tmp").write_bytes(b"half a checkpoint")
    byol.main(["--resume", str(out / "checkpoint.pt"), "--epochs", "2"])
    assert not list(out.glob("*.tmp")) and load(out / "checkpoint.pt")["epoch"] == 2


@pytest.mark.parametrize("case, expected", [("a file", "File exists"), ("under a file", "Not a directory"),
                                            ("unwritable", "permission denied")])
def test_an_unusable_out_dir_is_a_one_line_error(case, expected, tmp_path):
    target = tmp_path / "target"
    if case == "unwritable":
        target.mkdir()
        target.chmod(0o500)
        if os.access(target, os.W_OK):
            pytest.skip("running as root: permissions are not enforced")
    else:
        target.write_text("a file")
    out_dir = target / "run" if case == "under a file" else target
    assert expected in one_line_error([*TINY, *SMALL_HEADS, "--out-dir", str(out_dir), "--epochs", "1"])


# --- 2. resume traps ------------------------------------------------------------------------------
def test_resume_refuses_other_data_behind_the_same_settings(tmp_path):
    first = write_jpeg_folder(tmp_path / "first", per_class=8)
    flags = ["--dataset", "folder", "--img-size", "16", "--batch-size", "8", "--device", "cpu", "--knn-k", "4",
             *SMALL_HEADS]
    out = tmp_path / "run"
    byol.main([*flags, "--data-dir", str(first), "--epochs", "2", "--max-steps", "2", "--out-dir", str(out)])
    other = write_jpeg_folder(tmp_path / "other", per_class=8)  # same classes and sizes, other pixels
    message = one_line_error(["--resume", str(out / "checkpoint.pt"), "--data-dir", str(other)])
    assert "holds other data" in message and "fingerprint" in message
    copy = tmp_path / "copy"
    os.rename(first, copy)  # the same images elsewhere are the same data
    history = byol.main(["--resume", str(out / "checkpoint.pt"), "--data-dir", str(copy)])
    assert [row["epoch"] for row in history] == [1, 2]


def test_a_resumed_run_keeps_its_log_every(tmp_path, capsys):
    out = tmp_path / "run"
    run(out, "--epochs", "2", "--max-steps", "4", "--log-every", "1")
    capsys.readouterr()
    byol.main(["--resume", str(out / "checkpoint.pt")])
    steps = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()
             if line.startswith("epoch") and " step " in line]
    assert steps == [f"epoch 2/2 step {step}/8" for step in (5, 6, 7, 8)]


def test_a_progress_line_at_least_once_per_epoch(tmp_path, capsys):
    run(tmp_path / "run", "--epochs", "2", "--log-every", "1000")
    steps = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()
             if line.startswith("epoch") and " step " in line]
    assert steps == ["epoch 1/2 step 4/8", "epoch 2/2 step 8/8"]


# --- 3. non-finite weights ------------------------------------------------------------------------
def test_weights_that_overflow_stop_the_run_before_evaluation_and_leave_no_folder(tmp_path):
    message = one_line_error([*TINY, *SMALL_HEADS, "--out-dir", str(tmp_path / "run"), "--epochs", "1", "--lr",
                              "1e30"])
    assert "the weights hold NaN or inf" in message and "no checkpoint was written" in message
    assert not (tmp_path / "run").exists()


def test_a_nan_batch_norm_statistic_is_caught(tmp_path):
    model = byol.BYOL(64, 32, 64)
    byol.stop_if_not_finite({"loss": 1.0}, model, 1, tmp_path / "checkpoint.pt")  # finite: no stop
    model.projector[1].running_var[3] = float("inf")
    with pytest.raises(SystemExit, match="the weights hold NaN or inf at step 7"):
        byol.stop_if_not_finite({"loss": 1.0}, model, 7, tmp_path / "checkpoint.pt")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_flag_values_are_rejected_at_parse_time(value, capsys):
    with pytest.raises(SystemExit) as stop:
        byol.main([f"--weight-decay={value}"])
    assert stop.value.code == 2 and f"got {value}" in capsys.readouterr().err


# --- 4. a full disk -------------------------------------------------------------------------------
def test_a_full_disk_keeps_the_last_good_checkpoint_and_no_partial_file(finished, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    out.mkdir()
    for name, data in finished[1].items():
        (out / name).write_bytes(data)
    real_save = torch.save

    def save_on_a_full_disk(state, path):  # what torch.save does when the disk fills: part of a file
        with open(path, "wb") as file:
            file.write(b"PK\x03\x04 the first megabyte")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(byol.torch, "save", save_on_a_full_disk)
    monkeypatch.setattr(byol.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
    message = one_line_error(["--resume", str(out / "checkpoint.pt"), "--epochs", "2"])
    assert message.startswith(f"byol.py: error: no space left on {byol.mount_point(out / 'x')} writing "
                              f"{out / 'checkpoint.pt'}; the last good checkpoint is {out / 'checkpoint.pt'}")
    monkeypatch.setattr(byol.torch, "save", real_save)
    assert snapshot(out) == finished[1]  # checkpoint, metrics and figure of epoch 1, no .tmp


def test_other_write_errors_name_the_file_and_the_cause(tmp_path, monkeypatch):
    def refused(state, path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(byol.torch, "save", refused)
    message = one_line_error([*TINY, *SMALL_HEADS, "--out-dir", str(tmp_path / "run"), "--epochs", "1"])
    assert "cannot write" in message and "Input/output error" in message and "no checkpoint was written" in message


# --- 5. one-line errors ---------------------------------------------------------------------------
def test_bad_checkpoints_and_flags_say_what_is_wrong(finished, tmp_path):
    out = finished[0]
    data = (out / "checkpoint.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    assert "it is truncated or damaged" in one_line_error(["--resume", str(tmp_path / "cut.pt")])
    (tmp_path / "notes.pt").write_text("notes\n")
    assert "it is not a PyTorch checkpoint" in one_line_error(["--resume", str(tmp_path / "notes.pt")])
    assert "is a folder" in one_line_error(["--resume", str(out)])
    partial = load(out / "checkpoint.pt")
    del partial["args"]
    torch.save(partial, tmp_path / "partial.pt")
    assert "lacks args" in one_line_error(["--resume", str(tmp_path / "partial.pt")])
    assert "--subset 5000 is larger than the 2000 images" in one_line_error(
        ["--dataset", "synthetic", "--subset", "5000", "--device", "cpu", "--out-dir", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("flags", [["--batch-size", "1"], ["--momentum", "1"], ["--momentum", "-0.1"]])
def test_out_of_range_flags_are_usage_errors(flags, capsys):
    with pytest.raises(SystemExit) as stop:
        byol.main(flags)
    assert stop.value.code == 2 and "error: argument" in capsys.readouterr().err


def test_ctrl_c_says_how_to_resume_and_exits_130(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, byol.__file__, *TINY, *SMALL_HEADS, "--epochs", "100", "--out-dir", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert f"continue with --resume {out / 'checkpoint.pt'}" in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert load(out / "checkpoint.pt")["step"] >= 4


def test_the_warm_up_longer_than_the_run_is_said_at_start(tmp_path, capsys):
    run(tmp_path / "run", "--epochs", "1", "--max-steps", "1")
    assert "warm-up (8 steps) is as long as the run (1 steps)" in capsys.readouterr().out


def test_subset_decodes_only_its_images(tmp_path, capsys):
    root = write_jpeg_folder(tmp_path / "images", per_class=8)
    flags = ["--dataset", "folder", "--data-dir", str(root), "--img-size", "16", "--batch-size", "4",
             "--device", "cpu", "--knn-k", "4", "--epochs", "1", "--max-steps", "1", *SMALL_HEADS]
    full = byol.prepare_data(byol.get_args(flags), torch.device("cpu"))
    chosen = byol.subset_indices(16, byol.get_args([*flags, "--subset", "4"]))
    capsys.readouterr()
    subset = byol.prepare_data(byol.get_args([*flags, "--subset", "4"]), torch.device("cpu"))
    assert "byol: 4 train / 16 test images of" in capsys.readouterr().out
    assert torch.equal(subset["train_x"], full["train_x"][chosen])
    assert torch.equal(subset["train_y"], full["train_y"][chosen])


# --- the collapse metric's ceiling ------------------------------------------------------------------
def test_the_collapse_metric_never_exceeds_one():
    """With the population std, sum_j var_j = 1 - |mean|^2 <= 1 for unit vectors, and the metric,
    sqrt(d) x mean_j std_j <= sqrt(sum_j var_j), is at most 1: 1 is the isotropic ceiling."""
    torch.manual_seed(0)
    for batch, dim in [(2, 1), (2, 8), (8, 4096), (64, 32)]:
        assert byol.collapse_metric(torch.randn(batch, dim)).item() <= 1 + 1e-6
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert byol.collapse_metric(opposite).item() == pytest.approx(1 / math.sqrt(2))


# --- 6. the evaluation tools --------------------------------------------------------------------
def test_linear_eval_names_its_output_by_its_settings(finished, tmp_path):
    flags = [str(finished[0] / "checkpoint.pt"), "--out-dir", str(tmp_path), "--device", "cpu", "--subset", "64",
             "--batch-size", "16"]
    linear_eval.main([*flags, "--epochs", "2"])
    linear_eval.main([*flags, "--epochs", "3", "--aug"])
    names = sorted(path.name for path in tmp_path.glob("linear_eval*.json"))
    assert names == ["linear_eval-subset64-epochs2-batch-size16.json",
                     "linear_eval-subset64-epochs3-batch-size16-aug.json"]
    epochs = [json.loads((tmp_path / name).read_text())["protocol"]["epochs"] for name in names]
    assert epochs == [2, 3]


def test_spectrum_marks_the_rank_limit_of_too_few_images(finished, tmp_path, saved_figures):
    spectrum.main([str(finished[0] / "checkpoint.pt"), "--out", str(tmp_path / "spectrum"), "--device", "cpu"])
    panels = saved_figures["spectrum.png"]
    assert [panel["title"] for panel in panels] == ["backbone output", "projector output"]
    # 500 test images: the 512-d backbone's covariance has rank 499 at most, marked; the 32-d projector's not.
    assert [panel["lines"] for panel in panels] == [2, 1]
