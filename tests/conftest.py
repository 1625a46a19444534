import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Tiny CPU settings for every training script: 16-px synthetic images, 64 of them, batches of 16 (4 steps an
# epoch), and small heads, so that a run takes seconds; for a ResNet-18, 8-px images (twice as fast).
TINY = ["--dataset", "synthetic", "--img-size", "16", "--subset", "64", "--batch-size", "16",
        "--device", "cpu", "--log-every", "2"]
HEADS = ["--proj-hidden", "64", "--proj-dim", "32", "--img-size", "8"]
SMALL = dict(byol=[*HEADS, "--pred-hidden", "64"], simsiam=[*HEADS, "--pred-hidden", "16"], directpred=HEADS,
             directcopy=HEADS, dino_vit=["--dim", "32", "--depth", "2", "--heads", "2", "--mlp-dim", "64",
                                         "--head-hidden", "64", "--bottleneck-dim", "16", "--out-dim", "64",
                                         "--local-crops", "2"])

@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(2)

def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)

def one_line_error(main, argv):
    """main(argv) stops with a one-line error of its own; returns the message."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = str(stop.value.code)
    assert ": error: " in message and "\n" not in message, message
    return message

def jpeg_folder(root, classes=("cat", "dog"), per_class=8, size=20):
    """An ImageFolder tree, train/ and test/, of small JPEGs: each class a colour, with noise."""
    from PIL import Image
    for split in ("train", "test"):
        for number, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                colour = 150 * torch.tensor([number % 2, 0, 1 - number % 2])
                pixels = torch.randint(0, 64, (size, size + 4, 3)) + colour
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / split / name / f"{i}.jpg")
    return root
