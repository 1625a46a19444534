import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Tiny, CPU-only settings shared by the tests of every training script: 16x16 synthetic images,
# a 64-image training subset and batches of 16, so a whole run takes seconds.
TINY = ["--dataset", "synthetic", "--img-size", "16", "--subset", "64", "--batch-size", "16", "--device", "cpu",
        "--log-every", "2", "--knn-k", "20"]


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def write_jpeg_folder(root, classes=("cat", "dog"), per_class=4, size=20):
    """An ImageFolder tree (train/ and test/) of small random JPEGs."""
    from PIL import Image
    for split in ("train", "test"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (size, size + 4, 3), dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.jpg")
    return root


@pytest.fixture
def saved_figures(monkeypatch):
    """What each figure saved during a test shows, by file name: for every visible panel its title, the
    number of lines and vertical markers plotted, and each line's y values (the figure itself, not the
    size of its file)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    saved, real_savefig = {}, Figure.savefig

    def savefig(figure, fname, *args, **kwargs):
        saved[Path(str(fname)).name.removesuffix(".tmp")] = [
            dict(title=ax.get_title(), lines=len(ax.get_lines()),
                 ydata=[[float(y) for y in line.get_ydata()] for line in ax.get_lines()])
            for ax in figure.axes if ax.axison]
        return real_savefig(figure, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved
