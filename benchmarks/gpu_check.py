"""The headline on a GPU, in a 9-minute budget (the data's unpacking aside): the step benchmark (syncs per
step, images per second, peak memory), then `byol.py --epochs 100` on the CIFAR-10 JPEG copy, then as many of
the other scripts as the time left allows, at fewer epochs. One JSON file holds what each run did:
epochs done, training images per second, and the kNN accuracy of the last epoch; the step benchmark's
peak GPU memory and host syncs per step.

    python benchmarks/gpu_check.py                          # CIFAR-10 JPEG from .data/ or ../shared/data
    python benchmarks/gpu_check.py --data-dir /tmp/cifar10-jpeg --out gpu_check.json

Without internet the data comes from the CIFAR-10 JPEG copy (`cifar10-jpeg.tar.gz`: 50,000 train and
2,000 test images; copy it to `.data/` so that it travels with the repository to a GPU machine).
"""
import argparse
import json
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARBALLS = [ROOT / ".data" / "cifar10-jpeg.tar.gz", ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"]
# After byol.py's headline run, the others at these lengths while time is left.
OTHERS = [("simsiam", 20), ("dino_vit", 10), ("directpred", 10), ("directcopy", 10)]


def find_data(data_dir):
    """DIR with train/ and test/: --data-dir, or the JPEG tarball unpacked into a temporary folder."""
    if data_dir:
        return Path(data_dir)
    tarball = next((path for path in TARBALLS if path.exists()), None)
    if tarball is None:
        raise SystemExit(f"gpu_check.py: error: no --data-dir, nor {' or '.join(map(str, TARBALLS))}")
    target = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    with tarfile.open(tarball) as archive:
        archive.extractall(target, filter="data")
    return next(path.parent for path in target.rglob("train") if (path.parent / "test").is_dir())


def summary(name, command, out_dir, seconds, returncode):
    """What a run did, from its metrics.jsonl (the kNN of the last evaluated epoch, never the best)."""
    metrics = out_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    last = rows[-1] if rows else {}
    return dict(script=name, command=" ".join(command), returncode=returncode, wall_s=seconds,
                epochs_done=last.get("epoch", 0), knn_top1_last=last.get("knn_top1"),
                collapse_last=last.get("collapse"), erank_last=last.get("erank"),
                images_per_s=last.get("images_per_s"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None,
                        help="CIFAR-10 in ImageFolder layout (default: the JPEG tarball)")
    parser.add_argument("--budget-s", type=float, default=540, help="wall-time budget of the whole check")
    parser.add_argument("--epochs", type=int, default=100, help="epochs of the byol.py run")
    parser.add_argument("--extra", default="",
                        help='flags added to every training run (e.g. "--subset 2000")')
    parser.add_argument("--out", default=None,
                        help="the JSON file (default: runs/gpu_check-<time>/gpu_check.json)")
    options = parser.parse_args(argv)
    start = time.time()
    out = Path(options.out or f"runs/gpu_check-{time.strftime('%Y%m%d-%H%M%S')}/gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(date=time.strftime("%Y-%m-%d"), budget_s=options.budget_s, runs=[])
    try:
        import torch
        report.update(torch=torch.__version__,
                      gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    except ImportError:
        pass

    def left():
        return options.budget_s - (time.time() - start)

    def run(command, timeout):
        began = time.time()
        try:
            returncode = subprocess.run(command, cwd=ROOT, timeout=max(1.0, timeout)).returncode
        except subprocess.TimeoutExpired:
            returncode = "timeout"
        return time.time() - began, returncode

    speed_json = out.parent / "train_speed.json"
    seconds, returncode = run([sys.executable, "benchmarks/train_speed.py", "--out", str(speed_json)],
                              min(120, left()))
    report["train_speed"] = dict(wall_s=seconds, returncode=returncode,
                                 **(json.loads(speed_json.read_text()) if speed_json.exists() else {}))
    data_dir = find_data(options.data_dir)
    plan = [("byol", options.epochs)] + OTHERS
    for name, epochs in plan:
        if left() < 60:
            break
        out_dir = out.parent / name
        command = [sys.executable, f"{name}.py", "--dataset", "folder", "--data-dir", str(data_dir),
                   "--epochs", str(epochs), "--out-dir", str(out_dir), *shlex.split(options.extra)]
        seconds, returncode = run(command, left() - 10)
        report["runs"].append(summary(name, command, out_dir, seconds, returncode))
        out.write_text(json.dumps(report, indent=1))
    report["wall_s"] = time.time() - start
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
