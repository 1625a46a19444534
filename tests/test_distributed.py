"""Data-parallel runs under torchrun, 2 gloo ranks on the CPU: they train as one process does, rank 0 alone
prints and writes, a checkpoint of theirs resumes in one process, and a NaN stops both with one message."""
import os
import subprocess
import sys

import torch

import dino_vit
from conftest import ROOT, SMALL, TINY, load

def torchrun(tmp_path, script, *flags):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / script), *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})

def test_two_ranks_train_as_one_process_and_their_checkpoint_resumes_in_one(tmp_path):
    """DINO has no batch norm: with drop-path off, 2 ranks stopped inside the second epoch give one process's
    losses, and resumed in one process they end with the weights of an uninterrupted one-process run."""
    flags = [*TINY, *SMALL["dino_vit"], "--drop-path", "0", "--epochs", "2", "--warmup-epochs", "0"]
    alone = dino_vit.main([*flags, "--out-dir", str(tmp_path / "alone")])
    done = torchrun(tmp_path, "dino_vit.py", *flags, "--max-steps", "6", "--out-dir", "ranks")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done:") == 1 and "2 x cpu" in done.stdout  # rank 0 alone prints
    ranks = load(tmp_path / "ranks" / "checkpoint.pt")
    assert abs(ranks["history"][0]["loss"] - alone[0]["loss"]) < 1e-4
    assert dino_vit.main(["--resume", str(tmp_path / "ranks" / "checkpoint.pt")])[-1]["step"] == 8
    expected = load(tmp_path / "alone" / "checkpoint.pt")["model"]
    weights = load(tmp_path / "ranks" / "checkpoint.pt")["model"]
    assert max((weights[name] - tensor).abs().max().item() for name, tensor in expected.items()) < 1e-5

def test_a_nan_on_the_ranks_stops_both_with_one_message(tmp_path):
    done = torchrun(tmp_path, "byol.py", *TINY, *SMALL["byol"], "--epochs", "1", "--lr", "1e30",
                    "--out-dir", "ranks")
    assert done.returncode != 0 and done.stderr.count("byol.py: error: loss is nan") == 1
    checkpoint = load(tmp_path / "ranks" / "checkpoint.pt")
    assert checkpoint["step"] == 0 and torch.equal(checkpoint["model"]["projector.0.weight"],
                                                   checkpoint["model"]["target.1.0.weight"])  # step 0's
