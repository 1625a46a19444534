"""Datasets beyond CIFAR: STL-10 (on a fake of its binary format), image folders streamed from their
files, and what changes from 96 px on (the ImageNet stem, the papers' blur, SimSiam's ImageNet projector)."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import byol
import linear_eval
import simsiam
from conftest import TINY, load, write_jpeg_folder
from test_distributed import DINO_SMALL, assert_equal_states, logged, torchrun

SMALL = ["--proj-hidden", "64", "--proj-dim", "32", "--pred-hidden", "64"]
FOLDER = ["--img-size", "16", "--batch-size", "8", "--device", "cpu", "--log-every", "2", "--knn-k", "5",
          "--dataset", "folder"]


def write_fake_stl10(root, n_train=24, n_unlabeled=40, n_test=16, seed=0):
    """STL-10's binary layout (stl10_binary/*.bin: uint8 images stored column-major, labels 1-10) with random
    images; returns the images as (N, 3, 96, 96) and the 0-based labels."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    made = {}
    for split, count in (("train", n_train), ("unlabeled", n_unlabeled), ("test", n_test)):
        images = rng.integers(0, 256, (count, 3, 96, 96), dtype=np.uint8)
        images.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        labels = np.arange(count) % 10
        if split != "unlabeled":
            (labels + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")
        made[split] = (torch.from_numpy(images), torch.from_numpy(labels))
    (folder / "class_names.txt").write_text("\n".join(f"class{c}" for c in range(10)) + "\n")
    return made


@pytest.fixture
def fake_stl10(tmp_path, monkeypatch):
    """A fake STL-10 in tmp_path/stl, which torchvision takes for the real one (its checksums skipped)."""
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)
    return tmp_path / "stl", write_fake_stl10(tmp_path / "stl")


def stl10_args(root, *flags):
    return byol.get_args(["--dataset", "stl10", "--data-dir", str(root), *flags])


def test_stl10_trains_on_train_and_unlabeled_and_keeps_the_labelled_images_for_the_knn(fake_stl10):
    root, made = fake_stl10
    args = byol.parse_arguments(["--dataset", "stl10", "--data-dir", str(root)])[0]
    assert args.img_size == 96  # --img-size 0: STL-10's own size
    data = byol.load_dataset(args, torch.device("cpu"))
    assert torch.equal(data["train_x"], torch.cat([made["train"][0], made["unlabeled"][0]]))
    assert data["train_y"].tolist() == made["train"][1].tolist() + [-1] * 40
    assert torch.equal(data["labelled_x"], made["train"][0]) and torch.equal(data["labelled_y"], made["train"][1])
    assert torch.equal(data["test_x"], made["test"][0]) and torch.equal(data["test_y"], made["test"][1])
    assert data["classes"] == [f"class{c}" for c in range(10)]
    # --subset cuts the self-supervised images, never the memory bank; --img-size resizes every split.
    small = byol.load_dataset(stl10_args(root, "--subset", "30", "--img-size", "32"), torch.device("cpu"))
    assert small["train_x"].shape == (30, 3, 32, 32) and small["labelled_x"].shape == (24, 3, 32, 32)


def test_a_stl10_run_monitors_knn_on_the_labelled_images_and_linear_eval_reads_it(fake_stl10, tmp_path):
    root, _ = fake_stl10
    out = tmp_path / "run"
    history = byol.main(["--dataset", "stl10", "--data-dir", str(root), "--img-size", "16", "--batch-size", "16",
                         "--device", "cpu", "--knn-k", "5", *SMALL, "--epochs", "1", "--out-dir", str(out)])
    checkpoint = load(out / "checkpoint.pt")
    assert checkpoint["data"]["num_train"] == 64 and 0 <= history[-1]["knn_top1"] <= 1
    result = linear_eval.main([str(out / "checkpoint.pt"), "--device", "cpu", "--epochs", "2", "--batch-size", "8"])
    assert result["num_train"] == 24 and result["num_test"] == 16  # the probe trains on the labelled images


def test_from_96_px_the_resnet_takes_the_imagenet_stem_and_the_views_the_papers_blur(fake_stl10, tmp_path,
                                                                                      monkeypatch):
    root, _ = fake_stl10
    blurred = []
    gaussian_blur = byol.gaussian_blur
    monkeypatch.setattr(byol, "gaussian_blur", lambda images, *rest: blurred.append(len(images))
                        or gaussian_blur(images, *rest))
    out = tmp_path / "run"
    byol.main(["--dataset", "stl10", "--data-dir", str(root), "--batch-size", "8", "--device", "cpu", "--knn-k", "5",
               *SMALL, "--epochs", "1", "--max-steps", "1", "--out-dir", str(out)])
    assert blurred == [8, 8]  # both views of the step: 1.0 and 0.1 (drawn per image, so the batch goes through)
    checkpoint = load(out / "checkpoint.pt")
    assert checkpoint["arch"]["backbone_kwargs"] == {"cifar_stem": False}
    assert checkpoint["model"]["backbone.conv1.weight"].shape == (64, 3, 7, 7)
    # The tools rebuild the ImageNet-stem backbone from the checkpoint.
    result = linear_eval.main([str(out / "checkpoint.pt"), "--device", "cpu", "--epochs", "1", "--batch-size", "8"])
    assert result["feature_dim"] == 512
    # Below 96 px: the CIFAR stem and no blur.
    blurred.clear()
    byol.main([*TINY, *SMALL, "--epochs", "1", "--max-steps", "1", "--out-dir", str(tmp_path / "small")])
    assert blurred == [] and load(tmp_path / "small" / "checkpoint.pt")["model"]["backbone.conv1.weight"].shape[-1] == 3


@pytest.mark.parametrize("script, expected", [("byol", (1.0, 0.1)), ("simsiam", (0.5, 0.5)),
                                              ("directpred", (1.0, 1.0)), ("directcopy", (1.0, 1.0))])
def test_from_96_px_each_view_blurs_as_often_as_its_paper_says(script, expected):
    """The share of images each large view blurs, over 20,000 draws: BYOL Table 6, SimSiam's ImageNet
    recipe, luckmatters' STL-10 transforms; and no blur below 96 px."""
    module = __import__(script)
    torch.manual_seed(0)
    for view, probability in zip(module.LARGE_VIEWS, expected):
        blur = module.sample_view_params(20000, 96, 96, view, "cpu")["blur"]
        assert abs(blur.float().mean().item() - probability) < 0.01, (script, probability)
    assert all("blur" not in module.sample_view_params(8, 32, 32, view, "cpu") for view in module.VIEWS)


def test_simsiam_takes_its_imagenet_projector_from_96_px():
    """Sec. 3 and the official builder: (Linear-BN-ReLU) x 2, Linear, BN without affine; CIFAR: one hidden layer."""
    large = simsiam.build_model(simsiam.get_args(["--img-size", "96", "--proj-hidden", "64", "--proj-dim", "32"]))
    small = simsiam.build_model(simsiam.get_args(["--img-size", "32", "--proj-hidden", "64", "--proj-dim", "32"]))
    assert simsiam.layer_names(large.projector) == ["linear", "bn", "relu", "linear", "bn", "relu", "linear", "bn"]
    assert simsiam.layer_names(small.projector) == ["linear", "bn", "relu", "linear", "bn"]
    assert isinstance(large.backbone.maxpool, nn.MaxPool2d) and isinstance(small.backbone.maxpool, nn.Identity)


@pytest.fixture
def folder(tmp_path):
    return write_jpeg_folder(tmp_path / "images", per_class=12)


def test_a_streamed_folder_gives_the_in_memory_batches_and_the_same_run(folder, tmp_path, capsys):
    flags = [*FOLDER, "--data-dir", str(folder), *SMALL, "--epochs", "2", "--seed", "3"]
    in_memory = byol.main([*flags, "--out-dir", str(tmp_path / "memory")])
    assert "decoding once" in capsys.readouterr().out
    streamed = byol.main([*flags, "--stream", "--out-dir", str(tmp_path / "stream")])
    assert "streamed from the files by" in capsys.readouterr().out
    assert logged(streamed) == logged(in_memory)
    assert_equal_states(load(tmp_path / "stream" / "checkpoint.pt")["model"],
                        load(tmp_path / "memory" / "checkpoint.pt")["model"])
    # The batches themselves: the same images, in the same order, from the second step of epoch 2 on.
    batches = {}
    for stream in (False, True):
        args = byol.get_args([*flags, *(["--stream"] if stream else [])])
        data = byol.prepare_data(args, torch.device("cpu"))
        assert isinstance(data["train_x"], byol.ImageFiles) == stream
        run = SimpleNamespace(args=args, data=data, compute=byol.compute_settings("cpu"), steps_per_epoch=3, step=4,
                              rng=byol.rng_state(torch.device("cpu")))
        batches[stream] = [batch.clone() for batch in byol.epoch_batches(1, run)]
    assert len(batches[True]) == 2 and all(torch.equal(a, b) for a, b in zip(batches[True], batches[False]))


def test_a_folder_over_the_memory_budget_is_streamed_and_a_corrupt_file_stops_it_in_one_line(folder, tmp_path,
                                                                                              monkeypatch, capsys):
    monkeypatch.setattr(byol, "memory_budget", lambda device: 1000)
    byol.main([*FOLDER, "--data-dir", str(folder), *SMALL, "--epochs", "1", "--out-dir", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert "streamed from the files by" in out and "more than the budget of 0.0 GB" in out
    broken = next((folder / "train" / "cat").iterdir())
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit) as stop:
        byol.main([*FOLDER, "--data-dir", str(folder), *SMALL, "--epochs", "1", "--out-dir", str(tmp_path / "b")])
    message = str(stop.value)
    assert message.startswith("byol.py: error: cannot decode image") and str(broken) in message
    assert "\n" not in message


def test_a_streamed_folder_resumes_in_memory(folder, tmp_path):
    """The fingerprint of files and that of pixels do not compare; a resumed run may take the other path."""
    flags = [*FOLDER, "--data-dir", str(folder), *SMALL, "--epochs", "2"]
    straight = byol.main([*flags, "--out-dir", str(tmp_path / "straight")])
    byol.main([*flags, "--stream", "--max-steps", "4", "--out-dir", str(tmp_path / "stopped")])
    resumed = byol.main(["--resume", str(tmp_path / "stopped" / "checkpoint.pt")])
    assert logged(resumed) == logged(straight)
    assert json.loads((tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()[-1])["epoch"] == 2


def test_two_ranks_stream_their_shares_as_one_process_decodes_them(folder, tmp_path):
    """DINO (no batch norm), drop-path off: 2 ranks streaming the folder train as one process in memory."""
    flags = [*FOLDER, "--data-dir", str(folder), *DINO_SMALL, "--drop-path", "0", "--epochs", "1",
             "--warmup-epochs", "0"]
    import dino_vit
    alone = dino_vit.main([*flags, "--out-dir", str(tmp_path / "alone")])
    done, dumps = torchrun(tmp_path, "dino_vit", *flags, "--stream", "--out-dir", "ranks")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [round(row["loss"], 4) for row in dumps[0]["history"]] == [round(row["loss"], 4) for row in alone]
    expected = load(tmp_path / "alone" / "checkpoint.pt")["model"]
    worst = max((dumps[0]["model"][name].double() - tensor.double()).abs().max().item()
                for name, tensor in expected.items() if tensor.is_floating_point())
    assert worst < 1e-5
