"""Data-parallel runs (torchrun, gloo on the CPU): the ranks see exactly the views of one process, keep
equal weights, reduce what each method must reduce, stop together, and resume in one process."""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import byol
import dino_vit
from conftest import TINY, load

ROOT = Path(__file__).resolve().parents[1]
# Runs a script's main() under torchrun and saves, per rank, the weights and history it ends with.
DRIVER = """
import importlib, os, sys, torch
sys.path.insert(0, sys.argv[1])
script = importlib.import_module(sys.argv[2])
finish_run = script.finish_run

def finish_and_dump(run):
    torch.save(dict(model=run.model.state_dict(), history=run.history), f"{sys.argv[3]}-rank{os.environ['RANK']}.pt")
    return finish_run(run)

script.finish_run = finish_and_dump
script.main(sys.argv[4:])
"""
DINO_SMALL = ["--dim", "32", "--depth", "2", "--heads", "2", "--mlp-dim", "64", "--head-hidden", "64",
              "--bottleneck-dim", "16", "--out-dim", "64", "--local-crops", "2"]
BYOL_SMALL = ["--proj-hidden", "64", "--proj-dim", "32"]


def torchrun(tmp_path, script, *flags, ranks=2):
    """`torchrun --standalone --nproc_per_node ranks script.py flags`; returns the process and the ranks' dumps."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    dump = tmp_path / "dump"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(ranks), str(driver), str(ROOT), script, str(dump), *flags],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    dumps = [load(f"{dump}-rank{rank}.pt") for rank in range(ranks) if Path(f"{dump}-rank{rank}.pt").exists()]
    return done, dumps


def logged(history):
    """A history without its timings, which are each rank's own."""
    return [{name: value for name, value in row.items() if name not in ("images_per_s", "epoch_time_s")}
            for row in history]


def assert_equal_states(first, second):
    assert first.keys() == second.keys()
    differing = [name for name in first if not torch.equal(first[name], second[name])]
    assert not differing, f"the ranks differ in {differing[:5]}"


@pytest.mark.parametrize("copies", [1, 3])
def test_the_ranks_views_together_are_the_views_of_one_process(copies):
    """Every rank draws the parameters of the global batch and keeps its share's: concatenated copy by
    copy, the shares of 4 ranks are the one-process views, pixel for pixel."""
    images = torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8)
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)

    def views(rank, world_size):
        compute = SimpleNamespace(**{**vars(byol.compute_settings("cpu")), "rank": rank, "world_size": world_size})
        torch.manual_seed(0)
        share = byol.own_share(images, compute)
        return dino_vit.augment(share, dino_vit.LOCAL_VIEW, zero, one, compute, 8, copies=copies)

    alone = views(0, 1).unflatten(0, (copies, 16))
    shares = torch.cat([views(rank, 4).unflatten(0, (copies, 4)) for rank in range(4)], dim=1)
    assert torch.equal(shares, alone)


def test_two_ranks_of_dino_train_as_one_process_and_resume_in_one(tmp_path):
    """DINO has no batch norm: with drop-path off, 2 ranks (stopped inside the second epoch, then resumed in
    one process) end with the weights of an uninterrupted one-process run, and the same losses and kNN."""
    flags = [*TINY, *DINO_SMALL, "--drop-path", "0", "--epochs", "2"]
    alone = dino_vit.main([*flags, "--out-dir", str(tmp_path / "alone")])
    done, dumps = torchrun(tmp_path, "dino_vit", *flags, "--max-steps", "6", "--out-dir", "ranks")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_equal_states(dumps[0]["model"], dumps[1]["model"])
    assert logged(dumps[0]["history"]) == logged(dumps[1]["history"])  # the same means and kNN on every rank
    assert done.stdout.count("done: epoch") == 1  # rank 0 alone prints
    resumed = dino_vit.main(["--resume", str(tmp_path / "ranks" / "checkpoint.pt")])
    for name in ("loss", "teacher_entropy", "kl_teacher_student"):
        assert [round(row[name], 4) for row in resumed] == [round(row[name], 4) for row in alone], name
    assert [row["knn_top1"] for row in resumed] == [row["knn_top1"] for row in alone]
    weights, expected = load(tmp_path / "ranks" / "checkpoint.pt")["model"], load(tmp_path / "alone" / "checkpoint.pt")
    worst = max((weights[name].double() - tensor.double()).abs().max().item()
                for name, tensor in expected["model"].items() if tensor.is_floating_point())
    assert worst < 1e-5


def test_two_ranks_of_directpred_keep_equal_weights_and_one_predictor(tmp_path):
    """Per-rank batch norm on the CPU; the gradients, F-hat (averaged over the ranks before its running
    average) and so W_p stay equal on both ranks, and so do the running statistics after averaging."""
    done, dumps = torchrun(tmp_path, "directpred", *TINY, *BYOL_SMALL, "--epochs", "1", "--pred-freq", "1",
                           "--out-dir", "ranks")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch norm per rank, over 8 images" in done.stdout
    first, second = dumps[0]["model"], dumps[1]["model"]
    assert_equal_states(first, second)
    assert first["F_hat"].abs().sum() > 0 and not torch.equal(first["predictor.weight"], torch.eye(32))
    assert logged(dumps[0]["history"]) == logged(dumps[1]["history"])


def test_a_failure_of_rank_0_alone_stops_both_ranks_with_one_message(tmp_path):
    """Rank 0 alone claims the run folder (and writes into it): when it fails, the other rank stops too."""
    (tmp_path / "taken").write_text("a file where the run folder should be")
    done, dumps = torchrun(tmp_path, "byol", *TINY, *BYOL_SMALL, "--pred-hidden", "64", "--epochs", "1",
                           "--out-dir", "taken")
    assert done.returncode != 0 and not dumps
    assert done.stderr.count("byol.py: error: cannot create the run folder taken") == 1


def test_a_nan_on_the_ranks_stops_both_with_one_message(tmp_path):
    done, dumps = torchrun(tmp_path, "byol", *TINY, *BYOL_SMALL, "--pred-hidden", "64", "--epochs", "1",
                           "--lr", "1e30", "--out-dir", "ranks")
    assert done.returncode != 0 and not dumps
    assert done.stderr.count("byol.py: error:") == 1
    assert "the weights hold NaN or inf" in done.stderr
    assert not (tmp_path / "ranks").exists()
