"""Linear evaluation: how linearly separable are the features a self-supervised backbone learnt?

Idea: the standard linear protocol (SimSiam Sec. 4.2, BYOL Sec. 4.1). The backbone of any checkpoint
written by the training scripts of this repo (ResNet-18 or ViT, rebuilt from its "arch" entry) is
frozen in eval mode, its features of every image are computed once (no augmentation, as in the
DirectPred reference code; --aug recomputes crop+flip features every epoch) and cached next to the
checkpoint in features-<key>.pt, the key hashing the checkpoint file and the dataset settings. One
linear layer is trained on them. kNN top-1 (k=20 and k=200) on the same features needs no training.

Protocol: batch norm without affine parameters standardises each feature, then a Linear layer (the
batch norm is a fixed affine map at test time, so the classifier stays linear); cross-entropy, Adam,
100 epochs of batch 256, lr 5e-2 decayed linearly per step to 5e-4, no weight decay: the linear
evaluation of the DirectPred reproduction by Bogatov Wilkman, Miszkurka and Hoeppe (KTH, Sec. 4).
Reported: the test top-1 and top-5 after the LAST epoch (the best epoch would be chosen on the test
set). The classifier and the kNN memory bank use the whole train split, whatever --subset the
self-supervised run trained on: the labels belong to the evaluation, as in the papers. --subset N
takes the N images a training run with --subset N and the checkpoint's --seed trained on.

Usage:
    python linear_eval.py runs/byol-<time>/checkpoint.pt              # the checkpoint's dataset
    python linear_eval.py CKPT --dataset folder --data-dir DIR        # DIR/train/<class>/*, DIR/test/<class>/*
    python linear_eval.py CKPT --subset 5000 --device cpu             # a quick check on 5000 train images
    python linear_eval.py CKPT --aug                                  # crop+flip features, recomputed each epoch
Writes linear_eval.json and linear_eval.png to the checkpoint's folder (or --out-dir); settings other
than the protocol's name the files: linear_eval-epochs10-aug.json for --epochs 10 --aug.
"""
import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms.v2 import functional as TF

SCRIPT = Path(__file__).stem


def fail(message):
    """Stop with a one-line error and a non-zero exit code (in a data-parallel run every rank stops, rank 0
    alone says why: the ranks take their decisions together)."""
    raise SystemExit(f"{SCRIPT}.py: error: {message}" if is_main_rank() else 1)


def log(line):
    """Print a progress or status line: in a data-parallel run, rank 0 alone prints."""
    if is_main_rank():
        print(line, flush=True)


def is_main_rank():
    """Rank 0 of a data-parallel run (torchrun sets RANK), or the one process of any other run."""
    return int(os.environ.get("RANK", 0)) == 0


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint.pt written by any training script of this repo")
    p.add_argument("--dataset", default=None, choices=["cifar10", "cifar100", "folder", "synthetic"],
                   help="default: the checkpoint's")
    p.add_argument("--data-dir", default=None, help="default: the checkpoint's")
    p.add_argument("--subset", type=int, default=0,
                   help="use the N train images a training run with --subset N used (0: the whole split)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-2, help="Adam learning rate, decayed linearly to lr/100")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--aug", action="store_true",
                   help="train on features of a random crop+flip of every image, recomputed each epoch")
    p.add_argument("--knn-t", type=float, default=0.1, help="temperature of the kNN vote weights")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="default: the checkpoint's folder")
    args = p.parse_args(argv)
    for name in ["epochs", "batch_size"]:
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.subset < 0 or args.weight_decay < 0:
        p.error("--subset and --weight-decay must not be negative")
    if not (args.lr > 0 and args.knn_t > 0):
        p.error("--lr and --knn-t must be positive")
    return args


# ------------------------------------------------------------------------------------------------
# Data (as in the training scripts): every split decoded once into a uint8 tensor (N, 3, H, W)
# ------------------------------------------------------------------------------------------------
def load_dataset(args, device):
    """Return dict(train_x, train_y, labelled_x, labelled_y, test_x, test_y, classes). train_x: the images
    self-supervised training sees, cut to --subset (an image folder decodes only those); labelled_x: the
    labelled training images, the kNN monitor's memory bank (the train split itself, but for STL-10, whose
    unlabeled images have no label); test_x: the test split. Images are uint8 tensors on the CPU, or, for an
    image folder that is streamed, ImageFiles."""
    if args.dataset == "folder":
        data = load_image_folder(args, device)
    else:
        loaders = dict(synthetic=lambda: synthetic_dataset(args.img_size, seed=args.seed),
                       stl10=lambda: load_stl10(args))
        data = loaders.get(args.dataset, lambda: load_cifar(args))()
        keep = subset_indices(len(data["train_x"]), args)
        if keep is not None:
            data["train_x"], data["train_y"] = data["train_x"][keep], data["train_y"][keep]
    data.setdefault("labelled_x", data["train_x"])
    data.setdefault("labelled_y", data["train_y"])
    return data


def load_stl10(args):
    """STL-10 from torchvision (Coates et al. 2011; DirectPred's dataset), downloaded into --data-dir when it
    is not there: self-supervised training on train+unlabeled (105,000 images at 96 px), the kNN memory bank
    on its 5,000 labelled train images, the 8,000 test images for the monitor."""
    try:
        splits = [torchvision.datasets.STL10(args.data_dir, split=split, download=True)
                  for split in ("train+unlabeled", "test")]
    except Exception as error:  # offline, partial download, corrupt archive
        fail(f"could not load stl10 into {args.data_dir} ({type(error).__name__}: {error}); offline, point "
             f"--data-dir at a folder holding the extracted stl10_binary, or use --dataset folder")
    (train_x, train_y), (test_x, test_y) = [
        (torch.from_numpy(stl.data).contiguous(), torch.from_numpy(stl.labels).long()) for stl in splits]
    if args.img_size != train_x.shape[-1]:
        train_x, test_x = (resize_uint8(x, args.img_size) for x in (train_x, test_x))
    labelled = train_y >= 0  # the unlabeled images have label -1
    return dict(train_x=train_x, train_y=train_y, labelled_x=train_x[labelled], labelled_y=train_y[labelled],
                test_x=test_x, test_y=test_y, classes=splits[0].classes)


def load_cifar(args):
    """CIFAR-10 or CIFAR-100 from torchvision, downloaded into --data-dir when it is not there."""
    cifar = torchvision.datasets.CIFAR10 if args.dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        splits = [cifar(args.data_dir, train=train, download=True) for train in (True, False)]
    except Exception as error:  # offline, partial download, corrupt archive
        fail(f"could not load {args.dataset} into {args.data_dir} ({type(error).__name__}: {error}); "
             f"offline, point --data-dir at a folder holding the extracted "
             f"{'cifar-10-batches-py' if args.dataset == 'cifar10' else 'cifar-100-python'}, "
             f"or use --dataset folder")
    (train_x, train_y), (test_x, test_y) = [
        (torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets)) for s in splits]
    if args.img_size != train_x.shape[-1]:
        train_x, test_x = (resize_uint8(x, args.img_size) for x in (train_x, test_x))
    return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=splits[0].classes)


def resize_uint8(images, size):
    """Resize the shorter side to `size`, then centre-crop to size x size (uint8 in, uint8 out), 4096 images at
    a time, so that a large split never has a float copy."""
    return torch.cat([TF.center_crop(TF.resize(chunk, size, antialias=True), size) for chunk in images.split(4096)])


def load_image_folder(args, device):
    """An ImageFolder tree, DIR/train/<class>/<image> and DIR/test/<class>/<image>, the train split cut to
    --subset: decoded once into memory, or, with --stream or when the decoded images would exceed
    memory_budget, kept as files and decoded in DataLoader workers as they are needed (ImageFiles)."""
    root = Path(args.data_dir)
    train, test = image_folder(root / "train"), image_folder(root / "test")
    if test.classes != train.classes:
        fail(f"{root}/train and {root}/test have different class folders")
    keep = subset_indices(len(train.samples), args)
    train_samples = train.samples if keep is None else [train.samples[position] for position in keep.tolist()]
    decoded_bytes = (len(train_samples) + len(test.samples)) * 3 * args.img_size ** 2
    budget = memory_budget(device)
    stream = args.stream or decoded_bytes > budget
    reason = "--stream" if args.stream else f"more than the budget of {budget / 2**30:.1f} GB, half the free memory"
    log(f"{SCRIPT}: {len(train_samples)} train / {len(test.samples)} test images of {root} at {args.img_size} px, "
        f"{decoded_bytes / 2**30:.2f} GB decoded: " + (f"streamed from the files by {loader_workers()} DataLoader "
                                                       f"workers ({reason})" if stream else "decoding once"))

    def images(samples):
        paths = [path for path, _ in samples]
        return ImageFiles(paths, args.img_size, device.type == "cuda") if stream else decode_files(paths, args.img_size)

    return dict(train_x=images(train_samples), train_y=torch.tensor([label for _, label in train_samples]),
                test_x=images(test.samples), test_y=torch.tensor(test.targets, dtype=torch.long),
                classes=train.classes)


def image_folder(root):
    """The files and class folders of root/<class>/<image> (torchvision's ImageFolder), nothing decoded."""
    try:
        return torchvision.datasets.ImageFolder(root)
    except OSError as error:  # missing folder, no class folders, or no images in them
        fail(f"cannot read image folder {root}: {error}; --data-dir must hold train/<class>/ and test/<class>/")


def memory_budget(device):
    """The most the decoded images may take: half the free memory of the device (CUDA) and of this machine's
    share of the host (which holds them while they are decoded), so the model and its activations keep the
    rest. Where the free host memory cannot be read (not Linux), no limit."""
    try:
        with open("/proc/meminfo") as file:
            host = next(int(line.split()[1]) * 1024 for line in file if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        host = math.inf
    budget = host / 2 / int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return min(budget, torch.cuda.mem_get_info(device)[0] / 2) if device.type == "cuda" else budget


def decode_image(path, img_size):
    """One image file as uint8 (3, img_size, img_size), with ImageFolder's loader (PIL, RGB) and resize_uint8:
    both data paths decode with it, so they see the same pixels."""
    try:
        image = TF.pil_to_tensor(torchvision.datasets.folder.default_loader(path))
    except Exception as error:
        raise ValueError(f"cannot decode image {path} ({type(error).__name__}: {error})") from None
    return resize_uint8(image[None], img_size)[0]


def decode_files(paths, img_size):
    """The in-memory path: every file decoded once, into one uint8 tensor (N, 3, img_size, img_size)."""
    try:
        return torch.stack([decode_image(path, img_size) for path in paths])
    except ValueError as error:
        fail(str(error))


def loader_workers():
    """DataLoader worker processes of a streamed run: this rank's share of the machine's cores, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


class ImageFiles:
    """The streamed path: an image folder's files, decoded only as their batches are needed, with decode_image
    in DataLoader worker processes, into uint8 batches (in pinned memory for a CUDA run, so their copy to the
    device overlaps the step). Sliced like a tensor, it gives the files of those images; split(n) and batches()
    give decoded batches, in order."""

    def __init__(self, paths, img_size, pin_memory):
        self.paths, self.img_size, self.pin_memory = paths, img_size, pin_memory

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return ImageFiles(self.paths[index], self.img_size, self.pin_memory)

    def to(self, device):
        return self  # files stay files; each decoded batch goes to the device as it comes

    def split(self, batch_size):
        return self.batches([range(start, min(start + batch_size, len(self))) for start in range(0, len(self), batch_size)])

    def batches(self, index_lists):
        """The decoded images of each list of positions, one uint8 batch per list."""
        # A generator of its own (the loader draws its workers' seeds from it), so that the global one, which
        # draws the views, draws what it would draw in memory.
        loader = torch.utils.data.DataLoader(DecodedFiles(self.paths, self.img_size), batch_sampler=index_lists,
                                             num_workers=loader_workers(), pin_memory=self.pin_memory,
                                             generator=torch.Generator())
        try:
            yield from loader
        except ValueError as error:  # a worker could not decode a file: its message is the last line
            fail(str(error).strip().splitlines()[-1].removeprefix("ValueError: "))


class DecodedFiles(torch.utils.data.Dataset):
    """What a DataLoader worker decodes: the i-th file with decode_image."""

    def __init__(self, paths, img_size):
        self.paths, self.img_size = paths, img_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, position):
        return decode_image(self.paths[position], self.img_size)


def subset_indices(num_images, args):
    """The train images of --subset N: the first N of a permutation drawn from --seed (None: all)."""
    if args.subset > num_images:
        fail(f"--subset {args.subset} is larger than the {num_images} images of the train split")
    if not args.subset:
        return None
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(args.seed))[:args.subset]


def synthetic_dataset(img_size, seed, num_classes=10, n_train=2000, n_test=500):
    """Class-structured images: each class is a colour grating of its own orientation and frequency,
    drawn with a random phase, contrast and noise per image, so augmentations keep the class visible
    and a network can learn it within a few CPU steps."""
    gen = torch.Generator().manual_seed(seed)
    angle = torch.rand(num_classes, generator=gen) * math.pi
    freq = 1.5 + 2.5 * torch.rand(num_classes, generator=gen)
    colour = torch.rand(num_classes, 3, generator=gen)
    coords = torch.linspace(0, 1, img_size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def make(n):
        labels = torch.arange(n) % num_classes
        phase = 2 * math.pi * torch.rand(n, 1, 1, generator=gen)
        a, f = angle[labels, None, None], freq[labels, None, None]
        grating = torch.sin(2 * math.pi * f * (xx * torch.cos(a) + yy * torch.sin(a)) + phase)
        contrast = 0.3 + 0.2 * torch.rand(n, 1, 1, 1, generator=gen)
        images = 0.5 + contrast * grating[:, None] * (2 * colour[labels, :, None, None] - 1)
        images = images + 0.05 * torch.randn(n, 3, img_size, img_size, generator=gen)
        return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels

    (train_x, train_y), (test_x, test_y) = make(n_train), make(n_test)
    return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                classes=[f"class{c}" for c in range(num_classes)])


def data_source(args, checkpoint):
    """Which images are evaluated: the checkpoint's dataset unless --dataset/--data-dir say otherwise,
    at the image size the backbone was trained on. Part of the feature cache's key."""
    trained = checkpoint["args"]
    dataset = args.dataset or trained["dataset"]
    return dict(dataset=dataset, img_size=checkpoint["data"]["img_size"], subset=args.subset,
                data_dir=None if dataset == "synthetic" else str(Path(args.data_dir or trained["data_dir"]).resolve()),
                seed=trained["seed"])  # picks the synthetic images and the --subset


def prepare_data(source, checkpoint, device):
    """The labelled training images (the probe's, with the run's --subset: the images it trained on, but for
    STL-10's unlabeled ones) and the test images of `source`, normalised with the training run's mean and std;
    a folder too large for memory is streamed, as in training."""
    data = load_dataset(argparse.Namespace(**source, stream=False), device)
    data["mean"] = torch.tensor(checkpoint["data"]["mean"]).view(1, 3, 1, 1)
    data["std"] = torch.tensor(checkpoint["data"]["std"]).view(1, 3, 1, 1)
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in data.items()
            if not key.startswith("train_")}


# ------------------------------------------------------------------------------------------------
# Augmentation for --aug: RandomResizedCrop + horizontal flip, drawn per image on the device
# ------------------------------------------------------------------------------------------------
CROP_RATIO = (3 / 4, 4 / 3)


def sample_crop_boxes(batch, height, width, scale, ratio, device, tries=10):
    """torchvision's RandomResizedCrop.get_params for a whole batch: the first of `tries` random
    boxes that fits, else the whole image (the images are square: no ratio to clamp). Returns
    (top, left, h, w)."""
    area = height * width
    target_area = area * torch.empty(batch, tries, device=device).uniform_(*scale)
    aspect = torch.empty(batch, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w = (target_area * aspect).sqrt().round()
    h = (target_area / aspect).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    found = fits.any(dim=1)
    w = torch.where(found, w, float(width))
    h = torch.where(found, h, float(height))
    top = torch.where(found, (torch.rand(batch, device=device) * (height - h + 1)).floor(), (height - h) // 2)
    left = torch.where(found, (torch.rand(batch, device=device) * (width - w + 1)).floor(), (width - w) // 2)
    return torch.stack([top, left, h, w], dim=1)


def crop_flip_resize(images, crop, flip, out_size):
    """Crop every image to its own box, mirror it if flip, and resize to out_size, in one bilinear
    grid_sample. Equals torchvision's resized_crop (+ hflip) when enlarging; shrinking skips its
    antialiasing."""
    batch, _, height, width = images.shape
    top, left, h, w = (t.unsqueeze(1) for t in crop.unbind(1))
    centres = (torch.arange(out_size, device=images.device) + 0.5) / out_size
    # Where each output pixel centre falls in the input, in pixels, kept between the box's outer
    # pixel centres (as cropping before resizing does), then in grid_sample's [-1, 1] coordinates.
    xs = (left + w * torch.where(flip.unsqueeze(1), 1 - centres, centres)).clamp(left + 0.5, left + w - 0.5)
    ys = (top + h * centres).clamp(top + 0.5, top + h - 0.5)
    grid = torch.stack(torch.broadcast_tensors(2 * xs[:, None, :] / width - 1, 2 * ys[:, :, None] / height - 1),
                       dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ------------------------------------------------------------------------------------------------
# Models: the backbones of the training scripts, and the linear classifier
# ------------------------------------------------------------------------------------------------
def resnet18_backbone(cifar_stem=True):
    """torchvision's ResNet-18 without its classifier: 512-d features. With cifar_stem (images below
    LARGE_IMAGE_SIZE), the CIFAR stem, a 3x3 stride-1 first convolution and no max-pool, so a 32x32 image keeps
    enough resolution; without, torchvision's ImageNet stem (7x7 stride 2, then a max-pool), as luckmatters
    and solo-learn train STL-10 at 96 px."""
    net = torchvision.models.resnet18()
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


class ViT(nn.Module):
    """Pre-norm Vision Transformer (Dosovitskiy et al. 2021) whose output is the final [CLS] token.
    Built from its keyword arguments alone, so a checkpoint's backbone_kwargs rebuild it. The
    positional embeddings are learned for img_size and resized for other crop sizes (DINO's local
    crops); drop_path is the stochastic-depth rate of the last block, rising linearly from 0 at the
    first (DINO uses it on the student only)."""

    def __init__(self, img_size=32, patch_size=4, dim=256, depth=6, heads=4, mlp_dim=1024, drop_path=0.0):
        super().__init__()
        self.heads = heads
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch_size) ** 2, dim))
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            attn_norm=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim), attn_out=nn.Linear(dim, dim),
            mlp_norm=nn.LayerNorm(dim), mlp=nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim)),
        )) for _ in range(depth))
        self.drop_path_rates = torch.linspace(0, drop_path, depth).tolist()
        self.norm = nn.LayerNorm(dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self.init_linear)

    @staticmethod
    def init_linear(module):
        """ViT and DINO initialisation of linear layers: truncated normal (std 0.02), zero bias."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def position_embedding(self, height, width):
        """Embeddings of the [CLS] token and of a height x width patch grid: the learned grid,
        bicubic-resized when the crop size differs from img_size."""
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        side = math.isqrt(grid.shape[1])
        if (height, width) != (side, side):
            grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
            grid = grid.flatten(2).transpose(1, 2)
        return torch.cat([cls_pos, grid], dim=1)

    def attention(self, block, x):
        batch, tokens, dim = x.shape
        qkv = block["qkv"](block["attn_norm"](x)).view(batch, tokens, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, tokens, head dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return block["attn_out"](out.transpose(1, 2).reshape(batch, tokens, dim))

    def forward(self, images):
        patches = self.patch_embed(images)  # (B, dim, H / patch, W / patch)
        x = torch.cat([self.cls_token.expand(len(patches), -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        x = x + self.position_embedding(*patches.shape[-2:])
        for block, rate in zip(self.blocks, self.drop_path_rates):
            x = x + torchvision.ops.stochastic_depth(self.attention(block, x), rate, "row", self.training)
            x = x + torchvision.ops.stochastic_depth(block["mlp"](block["mlp_norm"](x)), rate, "row", self.training)
        return self.norm(x[:, 0])


# "resnet18_cifar": the checkpoints of before the ImageNet stem (always the CIFAR one).
BACKBONES = {"resnet18": resnet18_backbone, "resnet18_cifar": resnet18_backbone, "vit": ViT}


def linear_classifier(feature_dim, num_classes):
    """Batch norm without affine parameters, then Linear. The batch norm standardises every feature
    (their scales differ by orders of magnitude between methods); at test time it is a fixed
    affine map that folds into the Linear layer, so the classifier is still linear."""
    return nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False), nn.Linear(feature_dim, num_classes))


# ------------------------------------------------------------------------------------------------
# Checkpoint: the backbone is rebuilt from the checkpoint's "arch" entry and loaded strictly
# ------------------------------------------------------------------------------------------------
ARCH_KEYS = ("backbone", "backbone_kwargs", "feature_dim", "backbone_prefix")


def load_checkpoint(path):
    """The checkpoint dict of a training script; a one-line error for anything else."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"no checkpoint at {path}")
    except Exception as error:
        fail(f"cannot read checkpoint {path} ({type(error).__name__}); the file is truncated or not a checkpoint")
    if not (isinstance(checkpoint, dict) and checkpoint.get("format") == 1
            and all(key in checkpoint for key in ("script", "arch", "model", "data", "args"))
            and isinstance(checkpoint["arch"], dict) and all(key in checkpoint["arch"] for key in ARCH_KEYS)):
        fail(f"{path} is not a checkpoint of a training script of this repo (no format-1 'arch', 'model' and "
             f"'data' entries)")
    return checkpoint


def build_backbone(checkpoint, path):
    """The frozen backbone, in eval mode, with the checkpoint's weights (strict: every tensor must fit)."""
    arch = checkpoint["arch"]
    if arch["backbone"] not in BACKBONES:
        fail(f"{path} has backbone {arch['backbone']!r}; known: {', '.join(BACKBONES)}")
    backbone = BACKBONES[arch["backbone"]](**arch["backbone_kwargs"])
    prefix = arch["backbone_prefix"]
    weights = {key[len(prefix):]: value for key, value in checkpoint["model"].items() if key.startswith(prefix)}
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as error:
        fail(f"the {prefix}* weights of {path} do not fit a {arch['backbone']} backbone "
             f"({' '.join(str(error).split())[:200]})")
    return backbone.requires_grad_(False).eval()


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# Features: computed once per (checkpoint, dataset) and cached next to the checkpoint
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def embed(network, images, mean, std, compute, batch_size=1024):
    """Features of un-augmented uint8 images, with the network in eval mode (whatever it has of batch
    norm on running statistics, drop-path off)."""
    out = []
    for chunk in images.split(batch_size):  # streamed images come in decoded host batches
        x = ((chunk.to(mean.device, non_blocking=True).float() / 255 - mean) / std)
        with compute.autocast:
            out.append(network(x.contiguous(memory_format=compute.memory_format)).float())
    return torch.cat(out)


@torch.no_grad()
def embed_crop_flip(network, images, mean, std, compute, batch_size=4096):
    """Features of one random crop+flip per image (the SimSiam/MoCo linear-protocol augmentation)."""
    out = []
    for chunk in images.split(batch_size):
        chunk = chunk.to(mean.device, non_blocking=True)  # streamed images come in decoded host batches
        batch, _, height, width = chunk.shape
        crop = sample_crop_boxes(batch, height, width, (0.08, 1.0), CROP_RATIO, chunk.device)
        flip = torch.rand(batch, device=chunk.device) < 0.5
        # Bilinear resampling is linear in the intensities, so it runs on the 0..255 values embed() takes.
        out.append(embed(network, crop_flip_resize(chunk.float(), crop, flip, height), mean, std, compute))
    return torch.cat(out)


def compute_features(backbone, data, compute):
    """Backbone features of the train and test images, with their labels and the class names."""
    return dict(train=embed(backbone, data["labelled_x"], data["mean"], data["std"], compute), train_y=data["labelled_y"],
                test=embed(backbone, data["test_x"], data["mean"], data["std"], compute), test_y=data["test_y"],
                classes=data["classes"])


def feature_cache(checkpoint_path, source):
    """The cache file features-<key>.pt next to the checkpoint, and its key: the hash of the
    checkpoint file's bytes and the dataset settings, so a changed checkpoint is never mistaken."""
    key = dict(checkpoint_sha256=file_sha256(checkpoint_path), **source)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return checkpoint_path.with_name(f"features-{digest}.pt"), key


def read_feature_cache(path, key, device):
    """The features (and labels) a previous run cached, or None. With them, no image is decoded."""
    if not path.exists():
        return None
    try:
        cache = torch.load(path, map_location=device, weights_only=True)
        if cache["key"] == key:
            print(f"features from {path}")
            return cache["features"]
    except Exception as error:  # a damaged cache is recomputed and replaced
        print(f"ignoring unreadable feature cache {path} ({type(error).__name__})")
    return None


def write_feature_cache(path, key, features):
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(dict(key=key, features={name: value.cpu() if torch.is_tensor(value) else value
                                           for name, value in features.items()}), tmp)
        os.replace(tmp, path)
    except OSError as error:  # a read-only run folder: evaluate anyway
        print(f"could not cache features in {path.parent} ({error})")


# ------------------------------------------------------------------------------------------------
# Training the linear classifier
# ------------------------------------------------------------------------------------------------
def train_linear(features, args, augmented_features=None):
    """Adam on cross-entropy, lr decayed linearly from --lr to --lr/100 over all steps. With
    augmented_features (a function), each epoch trains on freshly augmented features."""
    train_features, labels = features["train"], features["train_y"]
    num_classes = len(features["classes"])
    classifier = linear_classifier(train_features.shape[1], num_classes).to(train_features.device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_features) // args.batch_size  # the last partial batch is dropped
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.01,
                                                  total_iters=args.epochs * steps_per_epoch)
    history = []
    for epoch in range(args.epochs):
        epoch_features = augmented_features() if augmented_features else train_features
        classifier.train()
        permutation = torch.randperm(len(epoch_features), device=epoch_features.device)
        loss_sum = torch.zeros((), device=epoch_features.device)
        correct = torch.zeros((), device=epoch_features.device)
        for batch_indices in permutation[:steps_per_epoch * args.batch_size].view(steps_per_epoch, -1):
            logits = classifier(epoch_features[batch_indices])
            loss = F.cross_entropy(logits, labels[batch_indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(dim=1) == labels[batch_indices]).sum()
        top1, _, _ = test_accuracy(classifier, features["test"], features["test_y"], num_classes)
        history.append(dict(epoch=epoch + 1, loss=loss_sum.item() / steps_per_epoch,
                            train_top1=correct.item() / (steps_per_epoch * args.batch_size), test_top1=top1))
        if not math.isfinite(history[-1]["loss"]):
            fail(f"linear classifier loss is {history[-1]['loss']} at epoch {epoch + 1}; try a lower --lr")
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            row = history[-1]
            print(f"epoch {epoch + 1}/{args.epochs} | loss {row['loss']:.4f} | train top-1 "
                  f"{100 * row['train_top1']:.2f}% | test top-1 {100 * row['test_top1']:.2f}%", flush=True)
    return classifier, history


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_accuracy(classifier, features, labels, num_classes):
    """Top-1, top-5 and per-class top-1 of the classifier (in eval mode: batch norm on running stats)."""
    classifier.eval()
    top = classifier(features).topk(min(5, num_classes), dim=1).indices
    hit1 = (top[:, 0] == labels).float()
    hit5 = (top == labels[:, None]).any(dim=1).float()
    per_class = torch.zeros(num_classes, device=labels.device).index_add_(0, labels, hit1)
    per_class /= torch.bincount(labels, minlength=num_classes).clamp_min(1)
    return hit1.mean().item(), hit5.mean().item(), per_class.tolist()


@torch.no_grad()
def knn_top1(train_features, train_labels, test_features, test_labels, k, temperature, chunk=1024):
    """Weighted kNN (Wu et al. 2018): the k most cosine-similar training images vote for their
    class with weight exp(similarity / temperature). Returns the top-1 accuracy on the test set."""
    train_features, test_features = F.normalize(train_features, dim=1), F.normalize(test_features, dim=1)
    num_classes = int(train_labels.max()) + 1
    k = min(k, len(train_features))
    correct = torch.zeros((), device=test_features.device)
    for features, labels in zip(test_features.split(chunk), test_labels.split(chunk)):
        similarity, neighbours = (features @ train_features.T).topk(k, dim=1)
        votes = torch.zeros(len(features), num_classes, device=features.device)
        votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp())
        correct += (votes.argmax(dim=1) == labels).sum()
    return correct.item() / len(test_labels)


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------
def plot_result(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = result["history"]
    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(16, 3.8), gridspec_kw=dict(width_ratios=[1, 1, 1.4]))
    axes[0].plot(epochs, [row["loss"] for row in history])
    axes[0].set_title("training loss (cross-entropy)")
    axes[1].plot(epochs, [row["train_top1"] for row in history], label="train")
    axes[1].plot(epochs, [row["test_top1"] for row in history], label="test")
    axes[1].axhline(result["knn_top1_k200"], color="gray", linestyle="--", label="kNN k=200")
    axes[1].set_title(f"top-1 (last epoch: test {100 * result['linear_top1']:.2f}%)")
    axes[1].set_ylim(0, 1)
    axes[1].legend()
    for ax in axes[:2]:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    classes = list(result["per_class_top1"])
    axes[2].bar(range(len(classes)), list(result["per_class_top1"].values()))
    if len(classes) <= 20:
        axes[2].set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes[2].axhline(result["linear_top1"], color="gray", linestyle="--")
    axes[2].set_ylim(0, 1)
    axes[2].set_title("test top-1 per class, last epoch (dashed: all classes)")
    fig.suptitle(f"linear evaluation of {result['script']}.py, epoch {result['epoch']}: {result['checkpoint']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def eval_compute_settings(device_name):
    """The training scripts' compute_settings without their views (this tool augments nothing on the
    device): bf16 autocast on CUDA, float32 elsewhere; channels-last images on CUDA and CPU."""
    device = pick_device(device_name)
    torch.backends.cudnn.benchmark = True
    return SimpleNamespace(device=device,
                           autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
                           memory_format=torch.contiguous_format if device.type == "mps" else torch.channels_last)


def pick_device(name, local_rank=0):
    """The device of --device; "cuda" (and "auto" with a GPU) is the rank's own GPU, cuda:LOCAL_RANK."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown --device {name!r}; use auto, cuda, mps or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but no CUDA GPU is visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        fail("--device mps, but MPS is not available")
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


# The settings that change a result; the device and the output folder do not.
RESULT_SETTINGS = ("dataset", "data_dir", "subset", "epochs", "batch_size", "lr", "weight_decay", "aug", "knn_t",
                   "seed")


def output_name(args):
    """linear_eval for the default protocol, else linear_eval-<the settings that differ from it>, so that
    a result never replaces one of other settings (--data-dir by a hash of its path)."""
    defaults = vars(get_args([args.checkpoint]))
    parts = []
    for name in RESULT_SETTINGS:
        value = getattr(args, name)
        if value == defaults[name]:
            continue
        if name == "data_dir":
            value = hashlib.blake2b(str(Path(value).resolve()).encode(), digest_size=3).hexdigest()
        parts.append(name.replace("_", "-") + ("" if value is True else str(value)))
    return "-".join([SCRIPT, *parts])


def main(argv=None):
    args = get_args(argv)
    checkpoint_path = Path(args.checkpoint)
    checkpoint = load_checkpoint(checkpoint_path)
    backbone = build_backbone(checkpoint, checkpoint_path)
    compute = eval_compute_settings(args.device)
    device = compute.device
    out_dir = Path(args.out_dir) if args.out_dir else checkpoint_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    source = data_source(args, checkpoint)
    start = time.time()
    cache_path, key = feature_cache(checkpoint_path, source)
    features = read_feature_cache(cache_path, key, device)
    from_cache = features is not None
    data_start = time.time()
    data = prepare_data(source, checkpoint, device) if args.aug or not from_cache else None
    data_time = time.time() - data_start
    backbone = backbone.to(device, memory_format=compute.memory_format)
    if not from_cache:
        features = compute_features(backbone, data, compute)
        write_feature_cache(cache_path, key, features)
    feature_time = time.time() - start - data_time  # hashing, and reading or computing and writing the cache
    train_features, test_features = features["train"], features["test"]
    print(f"{SCRIPT}: {checkpoint['script']}.py epoch {checkpoint['epoch']}, {len(train_features)} train / "
          f"{len(test_features)} test images of {source['dataset']}, {train_features.shape[1]}-d features on "
          f"{device} (images {data_time:.1f} s, features {feature_time:.1f} s)", flush=True)
    if len(train_features) < args.batch_size:
        fail(f"--batch-size {args.batch_size} is larger than the {len(train_features)} training images")

    start = time.time()
    augmented = (lambda: embed_crop_flip(backbone, data["labelled_x"], data["mean"], data["std"], compute)) if args.aug \
        else None
    classifier, history = train_linear(features, args, augmented)
    train_time = time.time() - start
    top1, top5, per_class = test_accuracy(classifier, test_features, features["test_y"], len(features["classes"]))
    knn = {k: knn_top1(train_features, features["train_y"], test_features, features["test_y"], k, args.knn_t)
           for k in (20, 200)}

    result = dict(checkpoint=str(checkpoint_path), script=checkpoint["script"], epoch=checkpoint["epoch"],
                  data=source, num_train=len(train_features), num_test=len(test_features),
                  feature_dim=train_features.shape[1],
                  protocol=dict(classifier="BatchNorm1d(affine=False) + Linear", optimizer="Adam", epochs=args.epochs,
                                batch_size=args.batch_size, lr=args.lr, lr_end=args.lr / 100,
                                schedule="linear per step", weight_decay=args.weight_decay, aug=args.aug,
                                seed=args.seed),
                  linear_top1=top1, linear_top5=top5, knn_top1_k20=knn[20], knn_top1_k200=knn[200], knn_t=args.knn_t,
                  per_class_top1=dict(zip(features["classes"], per_class)), history=history,
                  features_from_cache=from_cache, image_time_s=data_time, feature_time_s=feature_time,
                  train_time_s=train_time)
    name = output_name(args)
    tmp = out_dir / f"{name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out_dir / f"{name}.json")
    plot_result(result, out_dir / f"{name}.png")
    print(f"done: linear top-1 {100 * top1:.2f}% top-5 {100 * top5:.2f}% (last epoch), kNN top-1 "
          f"{100 * knn[20]:.2f}% (k=20) {100 * knn[200]:.2f}% (k=200); {train_time:.1f} s; "
          f"wrote {out_dir / name}.json")
    return result


if __name__ == "__main__":
    main()
