"""DINO: self-distillation with no labels (Caron et al., ICCV 2021, arXiv:2104.14294), a small ViT on CIFAR-10.

Idea: a student ViT learns to give, on every crop of an image (2 global, several small local ones),
the same distribution over K prototypes as a teacher gives on the global crops. The teacher is an
EMA of the student; its output is centred (minus a running mean) and sharpened (low temperature).
Centring alone collapses to the uniform distribution, sharpening alone to one prototype (Sec. 5.3).
Three diagnostics of the teacher's output distribution P_t are logged and plotted:
  - its entropy h(P_t): log K under uniform collapse, 0 under one-prototype collapse; it tells the two
    modes apart, but a sharp teacher that sends different images to different prototypes also has
    entropy near 0;
  - KL(teacher || centre), the mean KL divergence of each image's P_t from the batch mean of P_t (the
    centre, as a distribution): the mutual information between image and prototype. It is 0 in both
    collapse modes, as every image gets the same distribution, and high when the teacher assigns
    different images to different prototypes;
  - KL(teacher || student), the loss minus h(P_t) (DINO Fig. 7): 0 in both modes, as the student
    matches a teacher that ignores its input.

Usage:
    python dino_vit.py --epochs 100                                  # CIFAR-10, downloaded to ./data
    python dino_vit.py --dataset folder --data-dir DIR               # DIR/train/<class>/*, DIR/test/<class>/*
    python dino_vit.py --dataset synthetic --epochs 2 --device cpu   # a quick check, no download
    python dino_vit.py --no-centering                                # collapse: one prototype dominates
    python dino_vit.py --no-sharpening                               # collapse: uniform output
    python dino_vit.py --resume runs/dino_vit-<time>/checkpoint.pt   # continue a stopped run
"""
import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms.v2 import functional as TF

SCRIPT = Path(__file__).stem


def fail(message):
    """Stop with a one-line error and a non-zero exit code."""
    raise SystemExit(f"{SCRIPT}.py: error: {message}")


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
# A resumed run keeps its settings, except these flags of the invocation itself, and --epochs,
# --eval-every and --data-dir when given again.
RUN_FLAGS = ("max_steps", "log_every", "device", "compile", "out_dir", "resume")
RESUME_FLAGS = ("epochs", "eval_every", "data_dir")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "folder", "synthetic"])
    p.add_argument("--data-dir", default="./data", help="download folder (cifar) or DIR with train/ and test/ (folder)")
    p.add_argument("--img-size", type=int, default=32, help="images are resized once to this size")
    p.add_argument("--subset", type=int, default=0, help="train on a random N images of the train split (0: all)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=0,
                   help="stop after this many steps in total (0: no limit); the schedules still span --epochs")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate for batch 256, scaled by batch/256")
    p.add_argument("--weight-decay", type=float, default=0.04, help="at step 0, cosine to --weight-decay-end")
    p.add_argument("--momentum", type=float, default=0.9, help="AdamW beta1")
    p.add_argument("--warmup-epochs", type=float, default=10, help="linear learning-rate warm-up")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between kNN evaluations")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    p.add_argument("--knn-k", type=int, default=200)
    p.add_argument("--knn-t", type=float, default=0.1, help="temperature of the kNN vote weights")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="run folder (default: runs/<script>-<time>)")
    p.add_argument("--resume", default=None, help="checkpoint.pt of a run to continue")
    # ViT: patch 4, width 256, 6 blocks of 4 heads, MLP 1024 (a CIFAR-sized ViT); drop-path on the student.
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--mlp-dim", type=int, default=1024)
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth of the student's last block")
    # DINO (Sec. 3.1, 3.2 and official code): head 2048 -> 2048 -> 256 -> K prototypes, multi-crop,
    # teacher temperature 0.04 -> 0.07, weight decay 0.04 -> 0.4, teacher EMA 0.996 -> 1.
    p.add_argument("--head-hidden", type=int, default=2048)
    p.add_argument("--bottleneck-dim", type=int, default=256)
    p.add_argument("--out-dim", type=int, default=4096, help="K, the number of prototypes")
    p.add_argument("--local-crops", type=int, default=6, help="local crops per image (half the image size)")
    p.add_argument("--teacher-temp", type=float, default=0.07, help="teacher temperature after its warm-up")
    p.add_argument("--teacher-temp-warmup-epochs", type=float, default=30,
                   help=f"linear warm-up of the teacher temperature from {TEACHER_TEMP_START}")
    p.add_argument("--weight-decay-end", type=float, default=0.4)
    p.add_argument("--ema-start", type=float, default=0.996, help="teacher EMA momentum at step 0 (cosine to 1)")
    p.add_argument("--no-centering", action="store_true", help="ablation: no centring of the teacher output")
    p.add_argument("--no-sharpening", action="store_true",
                   help=f"ablation: teacher temperature = student temperature ({STUDENT_TEMP})")
    return p


def get_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)

    positive = ["img_size", "epochs", "batch_size", "eval_every", "log_every", "knn_k", "patch_size", "dim",
                "depth", "heads", "mlp_dim", "head_hidden", "bottleneck_dim", "out_dim"]
    for name in positive:
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["subset", "max_steps", "warmup_epochs", "weight_decay", "momentum", "local_crops",
                 "teacher_temp_warmup_epochs", "weight_decay_end"]:
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.img_size < 8:
        p.error(f"--img-size must be at least 8, got {args.img_size}")
    if not (args.lr > 0 and args.knn_t > 0 and args.teacher_temp > 0):
        p.error("--lr, --knn-t and --teacher-temp must be positive")
    if not 0 <= args.ema_start <= 1:
        p.error(f"--ema-start must be in [0, 1], got {args.ema_start}")
    if args.momentum >= 1:
        p.error(f"--momentum (AdamW beta1) must be below 1, got {args.momentum}")
    if not 0 <= args.drop_path < 1:
        p.error(f"--drop-path must be in [0, 1), got {args.drop_path}")
    if args.dim % args.heads:
        p.error(f"--dim {args.dim} must be a multiple of --heads {args.heads}")
    crop_sizes = [args.img_size, local_crop_size(args.img_size)] if args.local_crops else [args.img_size]
    if any(size % args.patch_size for size in crop_sizes):
        p.error(f"--patch-size {args.patch_size} must divide the crop sizes {crop_sizes} (--img-size and its half)")
    return args


def resume_args(args, saved):
    """The settings of a resumed run: those it was started with (`saved`), and the flags above."""
    parser = build_parser()
    given = {name for name, value in vars(args).items() if value != parser.get_default(name)}
    for name in given - set(RUN_FLAGS) - set(RESUME_FLAGS):
        if getattr(args, name) != saved.get(name):
            fail(f"--{name.replace('_', '-')} {getattr(args, name)} differs from the checkpoint's {saved.get(name)}; "
                 f"a resumed run keeps its settings (only --epochs, --eval-every and --data-dir may change)")
    resumed = dict(saved, **{name: getattr(args, name) for name in RUN_FLAGS})
    resumed.update({name: getattr(args, name) for name in given & set(RESUME_FLAGS)})
    return argparse.Namespace(**resumed)


# ------------------------------------------------------------------------------------------------
# Data: every split decoded once into a uint8 tensor (N, 3, H, W) that lives on the training device
# ------------------------------------------------------------------------------------------------
def load_dataset(args):
    """Return dict(train_x, train_y, test_x, test_y, classes) with uint8 images on the CPU."""
    if args.dataset == "synthetic":
        return synthetic_dataset(args.img_size, seed=args.seed)
    if args.dataset == "folder":
        root = Path(args.data_dir)
        train_x, train_y, classes = read_image_folder(root / "train", args.img_size)
        test_x, test_y, test_classes = read_image_folder(root / "test", args.img_size)
        if test_classes != classes:
            fail(f"{root}/train and {root}/test have different class folders")
        return dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=classes)

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
    """Resize the shorter side to `size`, then centre-crop to size x size (uint8 in, uint8 out)."""
    return TF.center_crop(TF.resize(images, size, antialias=True), size)


def read_image_folder(root, img_size):
    """Decode an ImageFolder tree (root/<class>/<image>) into one uint8 tensor."""
    try:
        folder = torchvision.datasets.ImageFolder(root, transform=TF.pil_to_tensor)
    except OSError as error:  # missing folder, no class folders, or no images in them
        fail(f"cannot read image folder {root}: {error}; --data-dir must hold train/<class>/ and test/<class>/")
    images = []
    for index, (path, _) in enumerate(folder.samples):
        try:
            image, _ = folder[index]
        except Exception as error:
            fail(f"cannot decode image {path} ({type(error).__name__}: {error})")
        images.append(resize_uint8(image, img_size))
    return torch.stack(images), torch.tensor(folder.targets), folder.classes


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


# ------------------------------------------------------------------------------------------------
# Augmentation: batched on the device, every random parameter drawn per image
# ------------------------------------------------------------------------------------------------
# DINO's multi-crop (Sec. 3.1 and official code): 2 global crops of 40-100% of the image at full size
# and local crops of 5-40% at a smaller size, all with the flip, colour jitter and grayscale of BYOL. The
# global pair keeps DINO's asymmetry: Gaussian blur with probability 1 and 0.1, solarization 0 and 0.2;
# local crops are blurred with probability 0.5 and not solarized.
VIEW = dict(crop_scale=(0.4, 1.0), flip=0.5, jitter=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
            grayscale=0.2, solarize=0.0, blur=1.0)
VIEWS = (VIEW, {**VIEW, "blur": 0.1, "solarize": 0.2})
LOCAL_VIEW = {**VIEW, "crop_scale": (0.05, 0.4), "blur": 0.5}
CROP_RATIO = (3 / 4, 4 / 3)


def local_crop_size(img_size):
    """DINO pairs 224 px global crops with 96 px local ones; here local crops are half the image size."""
    return img_size // 2


def sample_view_params(batch, height, width, view, device):
    """Draw one set of augmentation parameters per image (torchvision's distributions)."""
    crop = sample_crop_boxes(batch, height, width, view["crop_scale"], CROP_RATIO, device)
    jitter = torch.rand(batch, device=device) < view["jitter"]

    def factor(strength):  # torchvision's ColorJitter: uniform in [max(0, 1 - s), 1 + s]
        drawn = torch.empty(batch, device=device).uniform_(max(0.0, 1 - strength), 1 + strength)
        return torch.where(jitter, drawn, 1.0)

    # Columns: brightness, contrast, saturation, hue. A factor of 1 (a shift of 0) is the identity.
    factors = torch.stack([factor(view["brightness"]), factor(view["contrast"]), factor(view["saturation"]),
                           torch.ones(batch, device=device)], dim=1)
    hue_shift = torch.where(jitter, torch.empty(batch, device=device).uniform_(-view["hue"], view["hue"]), 0.0)
    return dict(crop=crop, flip=torch.rand(batch, device=device) < view["flip"], jitter=jitter,
                factors=factors, hue_shift=hue_shift,
                order=torch.rand(batch, 4, device=device).argsort(dim=1),  # a random order per image
                grayscale=torch.rand(batch, device=device) < view["grayscale"],
                solarize=torch.rand(batch, device=device) < view["solarize"])


def sample_crop_boxes(batch, height, width, scale, ratio, device, tries=10):
    """torchvision's RandomResizedCrop.get_params for a whole batch: the first of `tries` random
    boxes that fits, else the whole image with the ratio clamped. Returns (top, left, h, w)."""
    area = height * width
    target_area = area * torch.empty(batch, tries, device=device).uniform_(*scale)
    aspect = torch.empty(batch, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w = (target_area * aspect).sqrt().round()
    h = (target_area / aspect).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

    if width / height < ratio[0]:
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    found = fits.any(dim=1)
    w = torch.where(found, w, float(fallback_w))
    h = torch.where(found, h, float(fallback_h))
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


def rgb_to_grayscale(images):
    """ITU-R 601-2 luma, as torchvision: (B, 3, H, W) -> (B, 1, H, W)."""
    r, g, b = images.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def blend(images, op, factor):
    """torchvision's brightness (op 0), contrast (op 1) and saturation (op 2), chosen per image:
    each blends the image with a reference (black, mean grey, grey image) and clamps to [0, 1]."""
    gray = rgb_to_grayscale(images)
    op = op.view(-1, 1, 1, 1)
    reference = torch.addcmul((op == 1) * gray.mean(dim=(1, 2, 3), keepdim=True), gray, op == 2)
    return torch.lerp(reference, images, factor.view(-1, 1, 1, 1)).clamp_(0, 1)


def adjust_hue(images, shift):
    """torchvision's adjust_hue per image: rotate the hue of HSV by `shift` (a fraction of the circle).
    A hue rotation keeps each pixel's max and min channel, so RGB = min + (max - min) * ramp(hue),
    with ramp the fully saturated colour of that hue; the hue is measured in sextants (0..6)."""
    r, g, b = images.split(1, dim=1)
    maxc, minc = images.amax(dim=1, keepdim=True), images.amin(dim=1, keepdim=True)
    spread = maxc - minc
    # HSV hue in sextants: 0 + (g - b) / spread where red is largest, 2 + ... green, 4 + ... blue.
    sextant = torch.where(maxc == r, g - b, torch.where(maxc == g, 2 * spread + b - r, 4 * spread + r - g))
    sextant = (sextant / spread.clamp_min(1e-12) + 6 * shift.view(-1, 1, 1, 1)) % 6
    distance = (sextant - torch.tensor([0.0, 2.0, 4.0], device=images.device).view(1, 3, 1, 1)).abs()
    ramp = (2 - torch.minimum(distance, 6 - distance)).clamp_(0, 1)  # red, green, blue peak at 0, 2, 4
    return torch.addcmul(minc, spread, ramp)


def color_jitter(images, factors, hue_shift, order, jitter):
    """ColorJitter with a random order per image. Brightness, contrast and saturation are blends;
    hue is not, so it is applied once for the whole batch and every blend is placed before or
    after it according to the image's own order."""
    hue_position = (order == 3).int().argmax(dim=1)
    for before_hue, positions in ((True, range(3)), (False, range(1, 4))):
        for position in positions:
            op = order[:, position]
            due = position < hue_position if before_hue else position > hue_position
            factor = torch.where(due, factors.gather(1, op.unsqueeze(1)).squeeze(1), 1.0)
            images = blend(images, op, factor)
        if before_hue:
            images = torch.where(jitter.view(-1, 1, 1, 1), adjust_hue(images, hue_shift), images)
    return images


def apply_view(images, params, out_size):
    """uint8 (B, 3, H, W) on the device -> augmented float images in [0, 1]."""
    x = crop_flip_resize(images.float().div_(255), params["crop"], params["flip"], out_size)
    x = color_jitter(x, params["factors"], params["hue_shift"], params["order"], params["jitter"])
    x = torch.where(params["grayscale"].view(-1, 1, 1, 1), rgb_to_grayscale(x).expand_as(x), x)
    # Solarize at 0.5 (invert every value above it) is min(x, 1 - x).
    return torch.where(params["solarize"].view(-1, 1, 1, 1), torch.minimum(x, 1 - x), x)


# Blur adapted to 32 px: DINO draws sigma uniformly in [0.1, 2] px for 224 px crops; SimCLR and BYOL,
# with the same sigma range, blur with a kernel of 10% of the image (23 taps at 224 px). Here the
# kernel is 10% of the crop to the nearest odd number, at least 3, so 3 taps at 32 and 16 px, and
# sigma keeps DINO's range per image: sigma 0.1 leaves a crop as it is, sigma 2 is close to a 3x3
# box filter (taps 0.32, 0.36, 0.32). Relative to the image this is stronger than DINO's blur (1 px
# of 32 against sigma up to 2 px of 224), but 3 taps is the smallest kernel that blurs at all.
BLUR_SIGMA = (0.1, 2.0)


def blur_kernel_size(crop_size):
    return max(3, 2 * round((0.1 * crop_size - 1) / 2) + 1)


def sample_blur(batch, view, device):
    """Per image: whether it is blurred (probability view["blur"]) and its sigma, uniform in BLUR_SIGMA."""
    return (torch.rand(batch, device=device) < view["blur"],
            torch.empty(batch, device=device).uniform_(*BLUR_SIGMA))


def gaussian_blur(images, sigma, kernel_size):
    """torchvision's gaussian_blur (reflect padding, a normalised kernel exp(-x^2 / 2 sigma^2) over
    kernel_size taps) with each image's own sigma. The kernel is separable: every channel of every
    image is one group of a 1-D convolution along the rows, then one along the columns."""
    batch, channels, height, width = images.shape
    half = kernel_size // 2
    taps = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)
    kernels = torch.softmax(-0.5 * (taps / sigma.unsqueeze(1)) ** 2, dim=1).repeat_interleave(channels, dim=0)
    padded = F.pad(images, (half,) * 4, mode="reflect").view(1, batch * channels, height + 2 * half, -1)
    rows = F.conv2d(padded, kernels.view(-1, 1, 1, kernel_size), groups=batch * channels)
    return F.conv2d(rows, kernels.view(-1, 1, kernel_size, 1), groups=batch * channels).view_as(images)


def augment(images, view, mean, std, out_size):
    """One random view of every image, normalised, in the memory layout the model wants. DINO blurs
    before it solarizes; the shared apply_view ends with solarization, so the blur comes after it,
    which differs only for the 2% of second global crops that draw both."""
    batch, _, height, width = images.shape
    params = sample_view_params(batch, height, width, view, images.device)
    blur, sigma = sample_blur(batch, view, images.device)
    x = apply_view(images, params, out_size)
    x = torch.where(blur.view(-1, 1, 1, 1), gaussian_blur(x, sigma, blur_kernel_size(out_size)), x)
    x = x.sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
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


def mlp(in_dim, hidden_dim, out_dim):
    """DINO's head MLP (Sec. 3.1): three linear layers with GELU, no batch norm."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                         nn.Linear(hidden_dim, out_dim))


PROJECTOR_LAYERS = ["linear", "gelu", "linear", "gelu", "linear"]  # the layout of mlp(), for the checkpoint


class DINOHead(nn.Module):
    """MLP to a bottleneck, l2-normalisation, then a weight-normalised linear layer to K prototype
    scores. The weight norm's magnitude is fixed at 1 (the official default for stability), so every
    score is a cosine similarity in [-1, 1] and the temperatures alone set how peaked a softmax is."""

    def __init__(self, in_dim, hidden_dim, bottleneck_dim, out_dim):
        super().__init__()
        self.mlp = mlp(in_dim, hidden_dim, bottleneck_dim)
        self.mlp.apply(ViT.init_linear)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        nn.init.ones_(magnitude)
        magnitude.requires_grad_(False)

    def forward(self, x):
        """Prototype scores (logits) and the bottleneck features they come from."""
        bottleneck = self.mlp(x)
        return self.last_layer(F.normalize(bottleneck, dim=-1)), bottleneck


class DINO(nn.Module):
    def __init__(self, vit_kwargs, drop_path, head_hidden, bottleneck_dim, out_dim, centering):
        super().__init__()
        self.backbone = ViT(**vit_kwargs, drop_path=drop_path)
        self.head = DINOHead(vit_kwargs["dim"], head_hidden, bottleneck_dim, out_dim)
        # The teacher starts as a copy of the student (without drop-path) and is only ever moved
        # towards it by the EMA (Sec. 3.1): no gradient reaches it.
        self.teacher_backbone = ViT(**vit_kwargs).requires_grad_(False)
        self.teacher_backbone.load_state_dict(self.backbone.state_dict())
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.centering = centering
        self.register_buffer("center", torch.zeros(out_dim))  # stays 0 without centring

    def forward(self, global_views, local_views, teacher_temp):
        """DINO loss, the teacher's entropy and KL(teacher || centre) (see dino_loss), and the teacher's
        bottleneck features of the first global crop. global_views: both global crops of B images,
        stacked (2B, 3, H, W); local_views: the local crops (nB, 3, h, w) or None. Each crop size is
        one backbone pass (official code)."""
        batch = len(global_views) // 2
        features = self.backbone(global_views)
        if local_views is not None:
            features = torch.cat([features, self.backbone(local_views)])
        student_logits, _ = self.head(features)
        with torch.no_grad():  # only the global crops pass through the teacher (Sec. 3.1)
            teacher_logits, teacher_bottleneck = self.teacher_head(self.teacher_backbone(global_views))
        loss, teacher_entropy, center_kl = dino_loss(student_logits.unflatten(0, (-1, batch)),
                                                     teacher_logits.unflatten(0, (2, batch)), self.center,
                                                     teacher_temp)
        if self.centering:
            self.update_center(teacher_logits)
        return loss, teacher_entropy, center_kl, teacher_bottleneck[:batch]

    @torch.no_grad()
    def update_center(self, teacher_logits):
        """Sec. 3.1, Eq. 4: c <- m c + (1 - m) (batch mean of the teacher's output), m = 0.9."""
        self.center.lerp_(teacher_logits.float().mean(dim=0), 1 - CENTER_MOMENTUM)

    @torch.no_grad()
    def update_teacher(self, momentum):
        """teacher <- momentum * teacher + (1 - momentum) * student, all tensors in one fused call."""
        student = [*self.backbone.parameters(), *self.head.parameters()]
        teacher = [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()]
        torch._foreach_lerp_(teacher, student, 1 - momentum)


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------
STUDENT_TEMP = 0.1
TEACHER_TEMP_START = 0.04  # warmed up linearly to --teacher-temp
CENTER_MOMENTUM = 0.9


def dino_loss(student_logits, teacher_logits, center, teacher_temp):
    """DINO Eq. 3: the cross-entropy H(P_t, P_s) between the teacher's centred, sharpened softmax on
    each global crop and the student's softmax on every other crop, averaged over those pairs.
    student_logits (V, B, K), the 2 global crops first; teacher_logits (2, B, K).
    Also returns two collapse diagnostics of the teacher (module docstring): its mean entropy h(P_t),
    which the loss exceeds by KL(P_t || P_s) (Sec. 5.3), and KL(teacher || centre), the mean over the
    2B teacher outputs of KL(P_t || mean of P_t)."""
    teacher_log_probs = F.log_softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)
    teacher_probs = teacher_log_probs.exp()
    student_log_probs = F.log_softmax(student_logits.float() / STUDENT_TEMP, dim=-1)
    # cross_entropy[t, v]: the batch mean of H(P_t, P_s) for teacher crop t and student crop v.
    cross_entropy = -torch.einsum("tbk,vbk->tv", teacher_probs, student_log_probs) / teacher_probs.shape[1]
    same_crop = cross_entropy.diagonal().sum()  # a global crop is not compared with itself
    loss = (cross_entropy.sum() - same_crop) / (cross_entropy.numel() - len(teacher_probs))
    entropy = -(teacher_probs * teacher_log_probs).sum(dim=-1).mean()
    # mean_i KL(P_i || P) with P the mean of the P_i equals h(P) - mean_i h(P_i).
    center_kl = torch.special.entr(teacher_probs.flatten(0, 1).mean(dim=0)).sum() - entropy
    return loss, entropy, center_kl


# ------------------------------------------------------------------------------------------------
# Schedules and collapse metrics
# ------------------------------------------------------------------------------------------------
def cosine_schedule(step, total_steps, start, end, warmup_steps=0):
    """Linear warm-up from 0 to `start`, then a half cosine from `start` to `end`."""
    if step < warmup_steps:
        return start * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def teacher_temperature(step, warmup_steps, end):
    """DINO Sec. 3.2: the teacher temperature rises linearly from 0.04 to `end` over
    the warm-up (a high temperature early makes training unstable), then stays there."""
    if step >= warmup_steps:
        return end
    return TEACHER_TEMP_START + (end - TEACHER_TEMP_START) * step / warmup_steps


def collapse_metric(z):
    """Std over the batch of the l2-normalised outputs, averaged over dimensions, times sqrt(d):
    about 1 when outputs spread over the sphere, 0 when every image maps to the same point."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean() * math.sqrt(z.shape[1])


def effective_rank(z):
    """Roy & Vetterli (2007): exp of the entropy of the normalised singular values of the
    l2-normalised embedding, uncentred so that a single point has rank 1 (not noise-level rank)."""
    s = torch.linalg.svdvals(F.normalize(z.float(), dim=1))
    p = s / s.sum()
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum()).item()


# ------------------------------------------------------------------------------------------------
# Evaluation: kNN monitor on the teacher's backbone features
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def embed(network, images, mean, std, batch_size=1024):
    """Features of un-augmented uint8 images, in eval mode (batch norm on running statistics)."""
    out = []
    for chunk in images.split(batch_size):
        x = (chunk.float() / 255 - mean) / std
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.is_cuda):
            out.append(network(x).float())
    return torch.cat(out)


@torch.no_grad()
def knn_top1(train_features, train_labels, test_features, test_labels, k, temperature, chunk=1024):
    """Weighted kNN (Wu et al. 2018): the k most cosine-similar training images vote for their
    class with weight exp(similarity / temperature). Returns the top-1 accuracy on the test set."""
    train_features, test_features = F.normalize(train_features, dim=1), F.normalize(test_features, dim=1)
    num_classes = int(train_labels.max()) + 1
    k = min(k, len(train_features))
    correct = torch.zeros((), device=test_features.device)
    for features, labels in zip(test_features.split(chunk), test_labels.split(chunk)):
        similarity, index = (features @ train_features.T).topk(k, dim=1)
        votes = torch.zeros(len(features), num_classes, device=features.device)
        votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
        correct += (votes.argmax(dim=1) == labels).sum()
    return correct.item() / len(test_labels)


def evaluate(model, data, args):
    """kNN top-1 on the teacher's [CLS] features (DINO evaluates the teacher, which outperforms the
    student, Sec. 5.2); effective rank and collapse metric of the teacher's bottleneck features."""
    model.eval()
    train_features = embed(model.teacher_backbone, data["train_x"], data["mean"], data["std"])
    test_features = embed(model.teacher_backbone, data["test_x"], data["mean"], data["std"])
    with torch.no_grad():
        test_embedding = model.teacher_head.mlp(test_features)
    model.train()
    return dict(knn_top1=knn_top1(train_features, data["train_y"], test_features, data["test_y"],
                                  args.knn_k, args.knn_t),
                erank=effective_rank(test_embedding),
                eval_collapse=collapse_metric(test_embedding).item())


# ------------------------------------------------------------------------------------------------
# Checkpoints, metrics and plots
# ------------------------------------------------------------------------------------------------
def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a run killed mid-write keeps its last checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"no checkpoint at {path}")
    except Exception as error:
        fail(f"cannot read checkpoint {path} ({type(error).__name__}); the file is truncated or not a checkpoint")
    if not isinstance(checkpoint, dict) or checkpoint.get("script") != SCRIPT:
        writer = checkpoint.get("script") if isinstance(checkpoint, dict) else None
        fail(f"{path} was written by {writer + '.py' if writer else 'another program'}, not {SCRIPT}.py")
    return checkpoint


def write_metrics(history, out_dir):
    tmp = out_dir / "metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(tmp, out_dir / "metrics.jsonl")


def plot_history(history, path, out_dim):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    uniform = math.log(out_dim)
    panels = [("loss", "training loss", None), ("knn_top1", "kNN top-1 (test)", (0, 1)),
              ("collapse", "collapse metric (1 healthy, 0 collapsed)", (0, 1.1)),
              ("erank", "effective rank of the embedding", None),
              ("teacher_entropy", "teacher entropy (dashed: log K)", (0, 1.05 * uniform)),
              ("kl_teacher_center", "KL(teacher || centre)", (0, None)),
              ("kl_teacher_student", "KL(teacher || student)", (0, None))]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.2))
    axes.flat[4].axhline(uniform, color="grey", linestyle="--")
    # The last cell explains the three teacher panels (module docstring, DINO Sec. 5.3 and Fig. 7).
    axes.flat[7].axis("off")
    axes.flat[7].text(0, 1, "Reading the teacher panels\n\n"
                      "healthy: KL(teacher || centre) well above 0\n\n"
                      "uniform collapse (--no-sharpening):\n  entropy -> log K, KL(teacher || centre) -> 0\n\n"
                      "one-prototype collapse (--no-centering):\n  entropy -> 0, KL(teacher || centre) -> 0\n\n"
                      "KL(teacher || student) -> 0 in both:\n  the student copies a teacher that\n"
                      "  ignores its input", va="top", fontsize=10, transform=axes.flat[7].transAxes)
    for ax, (key, title, ylim) in zip(axes.flat, panels):
        ax.plot(epochs, [row[key] for row in history], marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{SCRIPT}: {path.parent.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown --device {name!r}; use auto, cuda, mps or cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but no CUDA GPU is visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        fail("--device mps, but MPS is not available")
    return device


def prepare_data(args, device):
    data = load_dataset(args)
    if args.subset:
        keep = torch.randperm(len(data["train_x"]), generator=torch.Generator().manual_seed(args.seed))
        keep = keep[:args.subset]
        data["train_x"], data["train_y"] = data["train_x"][keep], data["train_y"][keep]
    if len(data["train_x"]) < args.batch_size:
        fail(f"--batch-size {args.batch_size} is larger than the {len(data['train_x'])} training images")
    pixels = data["train_x"][:10000].float() / 255
    data["mean"] = pixels.mean(dim=(0, 2, 3)).view(1, 3, 1, 1)
    data["std"] = pixels.std(dim=(0, 2, 3)).view(1, 3, 1, 1)
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in data.items()}


def stop_if_not_finite(loss, step, checkpoint_path):
    """A NaN/inf loss ends the run before anything is saved, so the checkpoint on disk stays good."""
    if not math.isfinite(loss):
        kept = f"{checkpoint_path} is the last good one" if checkpoint_path.exists() else "no checkpoint was written"
        fail(f"loss is {loss} at step {step}; stopped without saving ({kept}); try a lower --lr")


CLIP_GRAD = 3.0  # the largest gradient norm of any one parameter (official code)
FREEZE_LAST_LAYER_EPOCHS = 1  # epochs during which the prototypes (the head's last layer) stay fixed


def clip_gradients(parameters, max_norm):
    """DINO's clipping (official code): each parameter's gradient on its own is scaled down to norm
    max_norm, rather than all of them by their joint norm; fused, without a host sync."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = torch.stack(torch._foreach_norm(grads))
    torch._foreach_mul_(grads, list((max_norm / (norms + 1e-6)).clamp(max=1.0).unbind()))


def rng_state(device):
    """The generators that draw the batches' augmentations: a run stopped inside an epoch
    (--max-steps) resumes with the draws the uninterrupted run would have made."""
    state = dict(cpu=torch.get_rng_state())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def format_seconds(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def main(argv=None):
    args = get_args(argv)
    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(args.resume)
        args = resume_args(args, checkpoint["args"])
    device = pick_device(args.device)
    if args.out_dir:
        out_dir = Path(args.out_dir)
    elif checkpoint:
        out_dir = Path(args.resume).parent
    else:
        out_dir = Path("runs") / f"{SCRIPT}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True

    data = prepare_data(args, device)
    steps_per_epoch = len(data["train_x"]) // args.batch_size  # the last partial batch is dropped
    total_steps = args.epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps

    torch.manual_seed(args.seed)
    vit_kwargs = dict(img_size=args.img_size, patch_size=args.patch_size, dim=args.dim, depth=args.depth,
                      heads=args.heads, mlp_dim=args.mlp_dim)
    model = DINO(vit_kwargs, args.drop_path, args.head_hidden, args.bottleneck_dim, args.out_dim,
                 centering=not args.no_centering).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    lr = args.lr * args.batch_size / 256
    trainable = [p for p in model.parameters() if p.requires_grad]
    # AdamW; weight decay (group 0, scheduled) on weights only, not on biases and norms (official code).
    optimizer = torch.optim.AdamW([dict(params=[p for p in trainable if p.ndim > 1]),
                                   dict(params=[p for p in trainable if p.ndim <= 1], weight_decay=0.0)],
                                  lr=lr, betas=(args.momentum, 0.999), weight_decay=args.weight_decay)
    history, step = [], 0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        history, step = checkpoint["history"], checkpoint["step"]
        print(f"resumed {args.resume} at step {step}")
    start_epoch = step // steps_per_epoch
    history = [row for row in history if row["epoch"] <= start_epoch]  # an unfinished epoch is redone
    train_model = torch.compile(model) if args.compile else model

    arch = dict(backbone="vit", backbone_kwargs=vit_kwargs, feature_dim=args.dim, backbone_prefix="teacher_backbone.",
                projector_prefix="teacher_head.mlp.", projector_layers=PROJECTOR_LAYERS)
    data_info = dict(dataset=args.dataset, img_size=args.img_size, num_classes=len(data["classes"]),
                     classes=list(data["classes"]), mean=data["mean"].flatten().tolist(),
                     std=data["std"].flatten().tolist())
    checkpoint_path = out_dir / "checkpoint.pt"
    print(f"{SCRIPT}: {len(data['train_x'])} train / {len(data['test_x'])} test images on {device}, "
          f"{steps_per_epoch} steps per epoch, writing to {out_dir}")

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    run_start, run_first_step = time.time(), step
    for epoch in range(start_epoch, args.epochs):
        if step >= last_step:
            break
        # All randomness of an epoch follows from (seed, epoch): a resumed run draws what the
        # uninterrupted run would have drawn.
        torch.manual_seed(args.seed * 100_003 + epoch)
        order = torch.randperm(len(data["train_x"]), device=device)
        batches = order[:steps_per_epoch * args.batch_size].view(steps_per_epoch, -1)
        if step > epoch * steps_per_epoch:  # resumed inside this epoch: skip its done batches
            batches = batches[step - epoch * steps_per_epoch:]
            set_rng_state(checkpoint["rng"], device)
        loss_sum = torch.zeros((), device=device)
        collapse_sum = torch.zeros((), device=device)
        entropy_sum = torch.zeros((), device=device)
        center_kl_sum = torch.zeros((), device=device)
        epoch_start, epoch_first_step = time.time(), step
        for index in batches:
            lr_now = cosine_schedule(step, total_steps, lr, 0.0, int(args.warmup_epochs * steps_per_epoch))
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            weight_decay = cosine_schedule(step, total_steps, args.weight_decay, args.weight_decay_end)
            optimizer.param_groups[0]["weight_decay"] = weight_decay
            teacher_temp = STUDENT_TEMP if args.no_sharpening else teacher_temperature(
                step, int(args.teacher_temp_warmup_epochs * steps_per_epoch), args.teacher_temp)
            images = data["train_x"][index]
            global_views = torch.cat([augment(images, view, data["mean"], data["std"], args.img_size)
                                      for view in VIEWS])
            local_views = augment(images.repeat(args.local_crops, 1, 1, 1), LOCAL_VIEW, data["mean"], data["std"],
                                  local_crop_size(args.img_size)) if args.local_crops else None
            with autocast:  # the temperature as a tensor: a new float each step would recompile
                loss, teacher_entropy, center_kl, z1 = train_model(global_views, local_views,
                                                                   torch.full((), teacher_temp, device=device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(trainable, CLIP_GRAD)
            if step < FREEZE_LAST_LAYER_EPOCHS * steps_per_epoch:
                # Official code: the prototypes stay fixed in the first epoch, which helps training start.
                for p in model.head.last_layer.parameters():
                    p.grad = None
            optimizer.step()
            # DINO Sec. 3.1: the teacher EMA momentum follows a cosine from 0.996 to 1, per step.
            ema_momentum = cosine_schedule(step, total_steps, args.ema_start, 1.0)
            model.update_teacher(ema_momentum)
            loss_sum += loss.detach()
            collapse_sum += collapse_metric(z1.detach())
            entropy_sum += teacher_entropy.detach()
            center_kl_sum += center_kl.detach()
            step += 1
            done = step - epoch_first_step
            if step % args.log_every == 0 or step == last_step:
                mean_loss = loss_sum.item() / done  # the only host sync, once every log_every steps
                stop_if_not_finite(mean_loss, step, checkpoint_path)
                speed = (step - run_first_step) * args.batch_size / (time.time() - run_start)
                eta = (last_step - step) * args.batch_size / speed
                print(f"epoch {epoch + 1}/{args.epochs} step {step}/{last_step} | loss {mean_loss:.4f} | "
                      f"collapse {collapse_sum.item() / done:.3f} | teacher entropy {entropy_sum.item() / done:.3f} | "
                      f"KL(t||c) {center_kl_sum.item() / done:.3f} | lr {lr_now:.2e} | {speed:.0f} img/s | "
                      f"eta {format_seconds(eta)}", flush=True)
            if step == last_step:
                break

        rng = rng_state(device)
        epoch_time = time.time() - epoch_start
        row = dict(epoch=epoch + 1, step=step, loss=loss_sum.item() / done, collapse=collapse_sum.item() / done,
                   teacher_entropy=entropy_sum.item() / done, kl_teacher_center=center_kl_sum.item() / done,
                   lr=lr_now, weight_decay=weight_decay, teacher_temp=teacher_temp, ema_momentum=ema_momentum,
                   images_per_s=done * args.batch_size / epoch_time, epoch_time_s=epoch_time)
        row["kl_teacher_student"] = row["loss"] - row["teacher_entropy"]  # H(P_t, P_s) = h(P_t) + KL(P_t || P_s)
        stop_if_not_finite(row["loss"], step, checkpoint_path)
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs or step == last_step:
            row.update(evaluate(model, data, args))
            print(f"epoch {epoch + 1}/{args.epochs} | loss {row['loss']:.4f} | collapse {row['collapse']:.3f} | "
                  f"teacher entropy {row['teacher_entropy']:.3f} (log K {math.log(args.out_dim):.3f}) | "
                  f"KL(t||c) {row['kl_teacher_center']:.3f} | KL(t||s) {row['kl_teacher_student']:.3f} | "
                  f"erank {row['erank']:.1f} | knn {100 * row['knn_top1']:.2f}% | {row['images_per_s']:.0f} img/s | "
                  f"{epoch_time:.1f} s/epoch", flush=True)
            history.append(row)
            write_metrics(history, out_dir)
            plot_history(history, out_dir / f"{SCRIPT}.png", args.out_dim)
        save_checkpoint(checkpoint_path, dict(
            script=SCRIPT, format=1, epoch=step // steps_per_epoch, step=step, rng=rng, args=vars(args), arch=arch,
            model=model.state_dict(), optimizer=optimizer.state_dict(), data=data_info, history=history))

    if history:
        last = history[-1]
        print(f"done: epoch {last['epoch']} kNN top-1 {100 * last['knn_top1']:.2f}% (last epoch), "
              f"collapse {last['collapse']:.3f}, teacher entropy {last['teacher_entropy']:.3f}, "
              f"KL(teacher || centre) {last['kl_teacher_center']:.3f}, outputs in {out_dir}")
    return history


if __name__ == "__main__":
    main()
