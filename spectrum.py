"""Spectra of what a self-supervised network learnt: where (and how far) it collapsed.

Idea: complete collapse maps every image to one point; dimensional collapse (Jing et al. 2021,
"Understanding Dimensional Collapse in Contrastive Self-supervised Learning", Fig. 2) leaves the
embeddings spread over fewer dimensions than they have, which shows as covariance eigenvalues that
drop to zero. For every checkpoint of the training scripts of this repo (ResNet-18 or ViT, rebuilt
from its "arch" entry) this script embeds the test split and reports, at the backbone output and
at the projector output:
- the eigenvalues of the covariance of the l2-normalised embeddings (eigvalsh in float64, clamped
  at 1e-12), on a log scale against their index, one line per checkpoint (Jing et al. Fig. 2);
- the effective rank (Roy & Vetterli 2007), applied NOT to those eigenvalues but to the singular
  values of the uncentred l2-normalised embedding matrix, as the training scripts' erank (and
  RankMe, Garrido et al. 2023): a single point has rank 1, where a centred spectrum is all zeros;
- the collapse metric of the training scripts (about 1 healthy, 0 collapsed).

For checkpoints with a linear predictor W_p and the running correlation F-hat of the projector
outputs (directpred.py, directcopy.py and their --predictor sgd baseline) it also checks the
assumptions of DirectPred (Tian et al. 2021, "Understanding self-supervised learning dynamics
without contrastive pairs", Sec. 4-5): the eigenvalues of F-hat and W_p, the alignment of each
eigenvector of F-hat with W_p, the asymmetry of W_p and the smallest eigenvalue of its symmetric
part, at the end of training and, from the checkpoint's history, over training (the panels of
Fig. 2 of the reproduction by Bogatov Wilkman, Miszkurka and Hoeppe, KTH).

Usage:
    python spectrum.py runs/byol-<time>/checkpoint.pt                     # one checkpoint
    python spectrum.py runs/*/checkpoint.pt --out runs/spectrum           # several, on one figure
    python spectrum.py CKPT --dataset folder --data-dir DIR               # test images of another dataset
Writes <out>.json, <out>.png and, with a linear predictor, <out>-predictor.png
(default --out: <folder of the first checkpoint>/spectrum).
"""
import argparse
import json
import math
import os
from pathlib import Path

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
    p.add_argument("checkpoints", nargs="+", help="checkpoint.pt files written by the training scripts of this repo")
    p.add_argument("--dataset", default=None, choices=["cifar10", "cifar100", "folder", "synthetic"],
                   help="default: each checkpoint's own")
    p.add_argument("--data-dir", default=None, help="default: each checkpoint's own")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--out", default=None,
                   help="path prefix of the outputs <out>.json, <out>.png, <out>-predictor.png "
                        "(default: <folder of the first checkpoint>/spectrum)")
    return p.parse_args(argv)


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


def test_images(args, checkpoint):
    """The test split of the checkpoint's dataset (or --dataset/--data-dir), at its training size."""
    trained = checkpoint["args"]
    source = argparse.Namespace(dataset=args.dataset or trained["dataset"],
                                data_dir=args.data_dir or trained["data_dir"],
                                img_size=checkpoint["data"]["img_size"], subset=0,
                                seed=trained["seed"])  # the synthetic images depend on the seed
    if source.dataset == "folder":  # decoding the train split too would take most of the run
        samples = image_folder(Path(source.data_dir) / "test").samples
        return decode_files([path for path, _ in samples], source.img_size)
    return load_dataset(source, torch.device("cpu"))["test_x"]


# ------------------------------------------------------------------------------------------------
# Models: the backbones of the training scripts
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


# ------------------------------------------------------------------------------------------------
# Checkpoint: backbone and projector are rebuilt from the checkpoint's "arch" entry, loaded strictly
# ------------------------------------------------------------------------------------------------
ARCH_KEYS = ("backbone", "backbone_kwargs", "feature_dim", "backbone_prefix", "projector_prefix",
             "projector_layers")


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


def load_weights(module, weights, what, path):
    """Strict loading: a missing, unexpected or misshapen tensor is an error, never skipped."""
    try:
        module.load_state_dict(weights)
    except RuntimeError as error:
        fail(f"the {what} weights of {path} do not fit ({' '.join(str(error).split())[:200]})")
    return module.requires_grad_(False).eval()


def prefixed(state_dict, prefix):
    return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}


def build_backbone(checkpoint, path):
    arch = checkpoint["arch"]
    if arch["backbone"] not in BACKBONES:
        fail(f"{path} has backbone {arch['backbone']!r}; known: {', '.join(BACKBONES)}")
    backbone = BACKBONES[arch["backbone"]](**arch["backbone_kwargs"])
    return load_weights(backbone, prefixed(checkpoint["model"], arch["backbone_prefix"]),
                        f"{arch['backbone_prefix']}* ({arch['backbone']})", path)


def build_projector(checkpoint, path):
    """nn.Sequential from the layer list in "arch"; the shape of every layer comes from its weights."""
    arch = checkpoint["arch"]
    prefix = arch["projector_prefix"]
    weights = prefixed(checkpoint["model"], prefix)
    layers = []
    for index, name in enumerate(arch["projector_layers"]):
        if name == "linear" and f"{index}.weight" in weights:
            out_dim, in_dim = weights[f"{index}.weight"].shape
            layers.append(nn.Linear(in_dim, out_dim, bias=f"{index}.bias" in weights))
        elif name == "bn" and f"{index}.running_mean" in weights:
            layers.append(nn.BatchNorm1d(len(weights[f"{index}.running_mean"]), affine=f"{index}.weight" in weights))
        elif name in ("relu", "gelu"):
            layers.append(nn.ReLU() if name == "relu" else nn.GELU())
        else:
            fail(f"{path}: projector layer {index} {name!r} is not linear/bn/relu/gelu with weights under {prefix}")
    return load_weights(nn.Sequential(*layers), weights, f"{prefix}* (projector)", path)


# ------------------------------------------------------------------------------------------------
# Embedding spectra and collapse metrics
# ------------------------------------------------------------------------------------------------
EIGENVALUE_FLOOR = 1e-12  # l2-normalised embeddings: the covariance's trace is at most 1


@torch.no_grad()
def embed_float32(backbone, projector, images, mean, std, batch_size=1024):
    """Backbone features and projector outputs of un-augmented images, in eval mode and in float32:
    the bf16 of the training scripts' kNN monitor keeps 3 significant digits, which would lay a
    noise floor over the small eigenvalues this script is about."""
    features, outputs = [], []
    for chunk in images.split(batch_size):
        h = backbone((chunk.float() / 255 - mean) / std)
        features.append(h)
        outputs.append(projector(h))
    return torch.cat(features), torch.cat(outputs)


def covariance_eigenvalues(z):
    """Eigenvalues of the covariance of the l2-normalised embeddings, largest first, as in Jing et
    al. Fig. 2; in float64, clamped at EIGENVALUE_FLOOR because eigvalsh returns round-off-sized
    negative values for a singular covariance, which a log axis cannot show."""
    z = F.normalize(z.double(), dim=1)
    z = z - z.mean(dim=0)
    covariance = z.T @ z / max(1, len(z) - 1)
    return torch.linalg.eigvalsh(covariance).flip(0).clamp_min(EIGENVALUE_FLOOR)


def collapse_metric(z):
    """Std over the batch of the l2-normalised outputs, averaged over dimensions, times sqrt(d):
    about 1 when outputs spread over the sphere, 0 when every image maps to the same point. The
    population std (divided by n), so that 1 is the ceiling of outputs spread evenly over the sphere."""
    return F.normalize(z.float(), dim=1).std(dim=0, correction=0).mean() * math.sqrt(z.shape[1])


def effective_rank(z):
    """Roy & Vetterli (2007): exp of the entropy of the normalised singular values of the
    l2-normalised embedding, uncentred so that a single point has rank 1 (not noise-level rank). The
    singular values are the square roots of the eigenvalues of the smaller Gram matrix (d x d or
    n x n), in float64: far cheaper than an SVD of the n x d embedding."""
    z = F.normalize(z.double(), dim=1)
    if not torch.isfinite(z).all():  # overflowing activations: no spectrum to take (eigvalsh would fail)
        return math.nan
    s = torch.linalg.eigvalsh(z.T @ z if len(z) >= z.shape[1] else z @ z.T).clamp_min(0).sqrt()
    distribution = s / s.sum()
    return torch.exp(-(distribution * distribution.clamp_min(1e-12).log()).sum()).item()


def embedding_report(z):
    return dict(dim=z.shape[1], eigenvalues=covariance_eigenvalues(z).tolist(), erank=effective_rank(z),
                collapse=collapse_metric(z).item())


# ------------------------------------------------------------------------------------------------
# Linear predictor: the quantities of DirectPred's analysis (as the training scripts log them)
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def predictor_statistics(F_hat, predictor):
    """What Tian et al. follow to show eigenspace alignment: the eigenvalues s_j of F-hat (descending)
    with eigenvectors u_j, the alignment u_j^T W_p u_j / |W_p u_j| (1 when u_j is an eigenvector of W_p
    with a positive eigenvalue) and its mean, the eigenvalues of W_p (real parts, descending) and its
    asymmetry |W - W^T|_F / |W + W^T|_F (0 for a symmetric W_p)."""
    s, U = torch.linalg.eigh(F_hat.double())
    s, U = s.flip(0), U.flip(1)
    W = predictor.double()
    WU = W @ U
    alignment = (U * WU).sum(dim=0) / WU.norm(dim=0).clamp(min=1e-12)
    return dict(F_eigenvalues=s.tolist(),
                predictor_eigenvalues=torch.linalg.eigvals(W).real.sort(descending=True).values.tolist(),
                alignment=alignment.tolist(), mean_alignment=alignment.mean().item(),
                asymmetry=((W - W.T).norm() / (W + W.T).norm().clamp(min=1e-12)).item())


def linear_predictor(checkpoint, path):
    """F-hat and W_p as applied. directpred.py and directcopy.py save F-hat as "F"; W_p is their
    bias-free predictor.weight, of which the symmetric part is applied when the run had --symmetric."""
    weight = checkpoint["model"].get("predictor.weight")
    if weight is None or weight.shape != checkpoint["F"].shape:
        fail(f"{path} saves F but no predictor.weight of its shape {tuple(checkpoint['F'].shape)}")
    return checkpoint["F"], (weight + weight.T) / 2 if checkpoint["args"].get("symmetric") else weight


def predictor_report(checkpoint, path):
    """DirectPred's quantities (Tian et al. Sec. 4-5) at the end of training, the smallest eigenvalue
    of W_p's symmetric part (below 0, W_p pushes the prediction away from the target along its
    eigenvector), and the same quantities over training as the run's history logged them. The
    history logs W_p's eigenvalues, not its symmetric part's: the smallest of those is known over
    training only for a W_p symmetric by construction (--predictor direct, or --symmetric)."""
    correlation, predictor = linear_predictor(checkpoint, path)
    trained = checkpoint["args"]
    symmetric = trained.get("predictor") == "direct" or trained.get("symmetric")
    keys = ("F_eigenvalues", "predictor_eigenvalues", "alignment", "asymmetry")
    history = [dict(epoch=row["epoch"], **{key: row[key] for key in keys},
                    sym_min_eigenvalue=row["predictor_eigenvalues"][-1] if symmetric else None)
               for row in checkpoint.get("history", []) if all(key in row for key in keys)]
    W = predictor.double()
    return dict(**predictor_statistics(correlation, predictor),
                sym_min_eigenvalue=torch.linalg.eigvalsh((W + W.T) / 2)[0].item(), history=history)


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------
def plot_spectra(reports, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, level in zip(axes, ("backbone", "projector")):
        for report in reports:
            spectrum = report[level]
            ax.semilogy(range(1, spectrum["dim"] + 1), spectrum["eigenvalues"],
                        label=f"{report['label']} (erank {spectrum['erank']:.1f}, collapse {spectrum['collapse']:.2f})")
        limit = reports[0]["num_images"] - 1  # a centred covariance of n images has rank n - 1 at most
        if limit < max(report[level]["dim"] for report in reports):
            ax.axvline(limit, color="grey", linestyle=":",
                       label=f"rank limit of {limit + 1} images: the eigenvalues beyond are 0, not collapse")
        ax.set_title(f"{level} output")
        ax.set_xlabel("index (largest first)")
        ax.set_ylabel("eigenvalue")
        ax.set_ylim(bottom=EIGENVALUE_FLOOR / 2)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"covariance eigenvalues of the l2-normalised embeddings of {reports[0]['num_images']} test images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_predictors(reports, path):
    """One row per checkpoint with a linear predictor: F-hat's and W_p's eigenvalues, the alignment
    of every eigenvector of F-hat (dark: largest eigenvalue) and W_p's asymmetry over training, as in
    Fig. 2 of the KTH reproduction, then the alignment at the end against the eigenvalue index."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("F_eigenvalues", "eigenvalues of F-hat"), ("predictor_eigenvalues", "eigenvalues of W_p (real part)"),
              ("alignment", "alignment u_j^T W_p u_j / |W_p u_j|"), ("asymmetry", "asymmetry |W-W^T| / |W+W^T|")]
    fig, axes = plt.subplots(len(reports), 5, figsize=(20, 3.8 * len(reports)), squeeze=False)
    for row, report in zip(axes, reports):
        predictor = report["predictor"]
        epochs = [entry["epoch"] for entry in predictor["history"]]
        for ax, (key, title) in zip(row, panels):
            values = [entry[key] for entry in predictor["history"]]
            if values and isinstance(values[0], list):
                ax.set_prop_cycle(color=plt.cm.viridis([j / len(values[0]) for j in range(len(values[0]))]))
            ax.plot(epochs, values, marker="o", markersize=3)
            if key == "F_eigenvalues":
                ax.set_yscale("log", nonpositive="mask")  # the eigenvalues of F-hat span decades
            ax.set_title(f"{report['label']}\n{title}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        row[1].axhline(0, color="black", linewidth=0.8)  # below it, W_p pushes away from the target
        row[2].set_ylim(-1.05, 1.05)
        row[4].plot(range(1, len(predictor["alignment"]) + 1), predictor["alignment"], marker="o", markersize=3)
        row[4].set_ylim(-1.05, 1.05)
        row[4].set_title(f"alignment at the end (asymmetry {predictor['asymmetry']:.3g},\n"
                         f"smallest eigenvalue of (W+W^T)/2: {predictor['sym_min_eigenvalue']:.3g})", fontsize=9)
        row[4].set_xlabel("eigenvector u_j of F-hat (largest eigenvalue first)")
        row[4].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
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


def analyse(path, checkpoint, args, device):
    backbone = build_backbone(checkpoint, path).to(device)
    projector = build_projector(checkpoint, path).to(device)
    mean = torch.tensor(checkpoint["data"]["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(checkpoint["data"]["std"], device=device).view(1, 3, 1, 1)
    features, outputs = embed_float32(backbone, projector, test_images(args, checkpoint).to(device), mean, std)
    report = dict(checkpoint=str(path), label=f"{checkpoint['script']} {path.parent.name} ep {checkpoint['epoch']}",
                  script=checkpoint["script"], epoch=checkpoint["epoch"], num_images=len(features),
                  backbone=embedding_report(features), projector=embedding_report(outputs))
    if "F" in checkpoint:
        report["predictor"] = predictor_report(checkpoint, path)
    return report


def main(argv=None):
    args = get_args(argv)
    paths = [Path(p) for p in args.checkpoints]
    checkpoints = [load_checkpoint(p) for p in paths]  # every file is checked before any work
    device = pick_device(args.device)
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions round like bf16 (see embed_float32)
    out = Path(args.out) if args.out else paths[0].parent / "spectrum"

    reports = []
    for path, checkpoint in zip(paths, checkpoints):
        report = analyse(path, checkpoint, args, device)
        for level in ("backbone", "projector"):
            r = report[level]
            print(f"{report['label']} | {level} {r['dim']}-d: erank {r['erank']:.2f}, collapse {r['collapse']:.3f}, "
                  f"top eigenvalue {r['eigenvalues'][0]:.3g}", flush=True)
        if "predictor" in report:
            r = report["predictor"]
            print(f"{report['label']} | predictor: mean alignment {sum(r['alignment']) / len(r['alignment']):.3f}, "
                  f"asymmetry {r['asymmetry']:.3g}, smallest eigenvalue of the symmetric part "
                  f"{r['sym_min_eigenvalue']:.3g}", flush=True)
        reports.append(report)

    result = dict(effective_rank=("Roy & Vetterli 2007, of the singular values of the uncentred l2-normalised "
                                  "test embedding (the training scripts' erank)"),
                  eigenvalues="covariance of the l2-normalised test embeddings, largest first, "
                              f"clamped at {EIGENVALUE_FLOOR}",
                  checkpoints=reports)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_name(out.name + ".json")
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    os.replace(tmp, json_path)
    written = [json_path, out.with_name(out.name + ".png")]
    plot_spectra(reports, written[1])
    with_predictor = [report for report in reports if "predictor" in report]
    if with_predictor:
        written.append(out.with_name(out.name + "-predictor.png"))
        plot_predictors(with_predictor, written[2])
    print(f"wrote {', '.join(map(str, written))}")
    return result


if __name__ == "__main__":
    main()
