"""DirectCopy: the predictor is the normalised correlation of its input, with no eigendecomposition
(Wang, Chen, Du & Tian, "Towards Demystifying Representation Learning with Non-contrastive
Self-supervision", 2021, arXiv:2110.04947) on CIFAR-10.

Idea: DirectPred (Tian et al. 2021) made cheaper. BYOL with a single linear predictor W_p that gets
no gradient: a running average F-hat of the correlation E[z z^T] of the online projections is kept
and copied into the predictor, W_p = F-hat / |F-hat|_2 + eps I. W_p has F-hat's eigenvectors with
eigenvalues s_j / max s + eps, where DirectPred takes the square root of s_j / max s and needs the
eigenvectors to apply it. `--predictor sgd` trains the same linear map instead (the baseline). The
log follows the eigenvalues of F-hat and W_p, their alignment, the asymmetry of W_p, and the
`collapse` column (about 1 healthy, 0 collapsed).

Usage:
    python directcopy.py --epochs 100                                  # CIFAR-10, downloaded to ./data
    python directcopy.py --predictor sgd --symmetric                   # trained linear predictor, W sym.
    python directcopy.py --ema 0                                       # no EMA: the target is the online net
    python directcopy.py --dataset folder --data-dir DIR               # DIR/train/<class>/*, DIR/test/<class>/*
    python directcopy.py --dataset synthetic --epochs 2 --device cpu   # a quick check, no download
    python directcopy.py --resume runs/directcopy-<time>/checkpoint.pt # continue a stopped run
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
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.06,
                   help="learning rate for batch 256, scaled by batch/256 (0.03 at batch 128), constant after warm-up")
    p.add_argument("--weight-decay", type=float, default=4e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--warmup-epochs", type=float, default=0, help="linear learning-rate warm-up")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between kNN evaluations")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    p.add_argument("--knn-k", type=int, default=200)
    p.add_argument("--knn-t", type=float, default=0.1, help="temperature of the kNN vote weights")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward pass")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="run folder (default: runs/<script>-<time>)")
    p.add_argument("--resume", default=None, help="checkpoint.pt of a run to continue")
    # Tian et al. 2021, CIFAR-10: projector 512 -> 128, one 128 x 128 linear predictor without bias,
    # a fixed EMA of 0.996. rho and eps: DirectCopy's setting (Wang et al. 2021).
    p.add_argument("--proj-hidden", type=int, default=512)
    p.add_argument("--proj-dim", type=int, default=128)
    p.add_argument("--ema", type=float, default=0.996,
                   help="target EMA momentum, fixed; 0: the target is the online network (SimSiam-style)")
    p.add_argument("--predictor", default="direct", choices=["direct", "sgd"],
                   help="direct: W_p set from F-hat; sgd: W_p trained by gradient descent (the baseline)")
    p.add_argument("--pred-freq", type=int, default=1, help="steps between settings of W_p (direct)")
    p.add_argument("--symmetric", action="store_true", help="sgd: use (W + W^T) / 2 as the predictor")
    p.add_argument("--rho", type=float, default=0.5, help="F-hat <- rho F-hat + (1 - rho) batch correlation")
    p.add_argument("--eps", type=float, default=0.3, help="added to every eigenvalue of W_p")
    return p


def get_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)

    positive = ["img_size", "epochs", "batch_size", "eval_every", "log_every", "knn_k", "proj_hidden",
                "proj_dim", "pred_freq"]
    for name in positive:
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["subset", "max_steps", "warmup_epochs", "weight_decay", "momentum"]:
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.img_size < 8:
        p.error(f"--img-size must be at least 8, got {args.img_size}")
    if not (args.lr > 0 and args.knn_t > 0):
        p.error("--lr and --knn-t must be positive")
    if not 0 <= args.ema <= 1:
        p.error(f"--ema must be in [0, 1], got {args.ema}")
    if not 0 <= args.rho < 1:
        p.error(f"--rho must be in [0, 1), got {args.rho}")
    if args.symmetric and args.predictor != "sgd":
        p.error("--symmetric applies to --predictor sgd (a direct W_p is symmetric by construction)")
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
# SimSiam on CIFAR (Chen & He 2021, Appendix D): crop scale 0.2-1, flip, colour jitter (0.4, 0.4, 0.4, 0.1)
# with probability 0.8, grayscale 0.2, no blur, no solarization. Both views are drawn the same way.
VIEW = dict(crop_scale=(0.2, 1.0), flip=0.5, jitter=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
            grayscale=0.2, solarize=0.0)
VIEWS = (VIEW, VIEW)
CROP_RATIO = (3 / 4, 4 / 3)


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


def augment(images, view, mean, std):
    """One random view of every image, normalised, in the memory layout the model wants."""
    batch, _, height, width = images.shape
    params = sample_view_params(batch, height, width, view, images.device)
    x = apply_view(images, params, height).sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------
def cifar_resnet18():
    """torchvision's ResNet-18 with the CIFAR stem: a 3x3 stride-1 first convolution, no max-pool,
    no classifier, so a 32x32 image keeps enough resolution and the output is 512-d."""
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def mlp(in_dim, hidden_dim, out_dim):
    """BYOL's projector (Sec. 3.3): Linear -> BatchNorm -> ReLU -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


PROJECTOR_LAYERS = ["linear", "bn", "relu", "linear"]  # the layout of mlp(), for the checkpoint


def direct_predictor(F_hat, eps):
    """Wang et al. 2021: W_p = F-hat / |F-hat|_2 + eps I. The spectral norm of the positive
    semi-definite F-hat is its largest eigenvalue; no eigenvector is needed."""
    return F_hat / torch.linalg.matrix_norm(F_hat, ord=2) + eps * torch.eye(len(F_hat), device=F_hat.device)


class BYOL(nn.Module):
    def __init__(self, proj_hidden, proj_dim, predictor, symmetric):
        super().__init__()
        self.backbone = cifar_resnet18()
        self.projector = mlp(512, proj_hidden, proj_dim)
        # One linear map without bias; set in closed form (--predictor direct) it takes no gradient.
        self.predictor = nn.Linear(proj_dim, proj_dim, bias=False).requires_grad_(predictor == "sgd")
        self.symmetric = symmetric
        # F-hat: running average of E[z z^T] over the online projections of both views, a statistic
        # of the data like batch norm's running mean, so it is saved and restored with the weights.
        self.register_buffer("F_hat", torch.zeros(proj_dim, proj_dim))
        # The target starts as a copy of the online backbone and projector and is only ever moved
        # towards them by the EMA (BYOL Sec. 3.1, Eq. 1): no gradient reaches it.
        self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def predictor_matrix(self):
        """W_p as applied: with --symmetric, the symmetric part of the weight, the symmetric W_p that
        Tian et al.'s analysis assumes."""
        weight = self.predictor.weight
        return (weight + weight.T) / 2 if self.symmetric else weight

    def forward(self, view1, view2):
        """Symmetrised loss (BYOL Eq. 2 plus its mirror) and the online projections of both views.
        The views are forwarded separately, so batch norm sees one view's statistics at a time."""
        z1, z2 = self.projector(self.backbone(view1)), self.projector(self.backbone(view2))
        predictor = self.predictor_matrix()
        p1, p2 = F.linear(z1, predictor), F.linear(z2, predictor)
        with torch.no_grad():  # the target runs in train mode too: its BN uses batch statistics
            t1 = self.target_projector(self.target_backbone(view1))
            t2 = self.target_projector(self.target_backbone(view2))
        return regression_loss(p1, t2) + regression_loss(p2, t1), z1, z2

    @torch.no_grad()
    def update_correlation(self, z1, z2, rho):
        """Tian et al. Eq. 19: F-hat <- rho F-hat + (1 - rho) mean of z z^T over both views (float32)."""
        z = torch.cat([z1, z2]).float()
        self.F_hat.lerp_(z.T @ z / len(z), 1 - rho)

    @torch.no_grad()
    def set_predictor(self, eps):
        self.predictor.weight.copy_(direct_predictor(self.F_hat, eps))

    @torch.no_grad()
    def update_target(self, momentum):
        """target <- momentum * target + (1 - momentum) * online, all tensors in one fused call."""
        online = [*self.backbone.parameters(), *self.projector.parameters()]
        target = [*self.target_backbone.parameters(), *self.target_projector.parameters()]
        torch._foreach_lerp_(target, online, 1 - momentum)


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------
def regression_loss(prediction, target):
    """BYOL Eq. 2: squared distance of the l2-normalised vectors, 2 - 2 cos(p, z), batch mean."""
    return 2 - 2 * F.cosine_similarity(prediction.float(), target.float(), dim=-1).mean()


# ------------------------------------------------------------------------------------------------
# Schedules and collapse metrics
# ------------------------------------------------------------------------------------------------
def cosine_schedule(step, total_steps, start, end, warmup_steps=0):
    """Linear warm-up from 0 to `start`, then a half cosine from `start` to `end`."""
    if step < warmup_steps:
        return start * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


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
# Evaluation: kNN monitor on the backbone features
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


@torch.no_grad()
def predictor_statistics(F_hat, predictor):
    """What Tian et al. follow to show eigenspace alignment: the eigenvalues s_j of F-hat (descending)
    with eigenvectors u_j, the alignment u_j^T W_p u_j / |W_p u_j| (1 when u_j is an eigenvector of W_p
    with a positive eigenvalue), the eigenvalues of W_p (real parts, descending) and its asymmetry
    |W - W^T|_F / |W + W^T|_F (0 for a symmetric W_p)."""
    s, U = torch.linalg.eigh(F_hat.double())
    s, U = s.flip(0), U.flip(1)
    W = predictor.double()
    WU = W @ U
    alignment = (U * WU).sum(dim=0) / WU.norm(dim=0).clamp(min=1e-12)
    return dict(F_eigenvalues=s.tolist(),
                predictor_eigenvalues=torch.linalg.eigvals(W).real.sort(descending=True).values.tolist(),
                alignment=alignment.tolist(),
                asymmetry=((W - W.T).norm() / (W + W.T).norm().clamp(min=1e-12)).item())


def evaluate(model, data, args):
    """kNN top-1 on backbone features; effective rank and collapse metric of the test embedding."""
    model.eval()
    train_features = embed(model.backbone, data["train_x"], data["mean"], data["std"])
    test_features = embed(model.backbone, data["test_x"], data["mean"], data["std"])
    with torch.no_grad():
        test_embedding = model.projector(test_features)
    model.train()
    return dict(knn_top1=knn_top1(train_features, data["train_y"], test_features, data["test_y"],
                                  args.knn_k, args.knn_t),
                erank=effective_rank(test_embedding),
                eval_collapse=collapse_metric(test_embedding).item(),
                **predictor_statistics(model.F_hat, model.predictor_matrix()))


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


def plot_history(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    panels = [("loss", "training loss", None), ("knn_top1", "kNN top-1 (test)", (0, 1)),
              ("collapse", "collapse metric (1 healthy, 0 collapsed)", (0, 1.1)),
              ("erank", "effective rank of the embedding", None), ("asymmetry", "asymmetry of W_p", None),
              # Eigenspace alignment over training: one line per eigenvector u_j of F-hat, dark for the largest.
              ("F_eigenvalues", "eigenvalues of F-hat", None), ("predictor_eigenvalues", "eigenvalues of W_p", None),
              ("alignment", "alignment u_j^T W_p u_j / |W_p u_j|", (-1.05, 1.05))]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.2))
    for ax, (key, title, ylim) in zip(axes.flat, panels):
        values = [row[key] for row in history]
        if isinstance(values[0], list):
            ax.set_prop_cycle(color=plt.cm.viridis([j / len(values[0]) for j in range(len(values[0]))]))
        ax.plot(epochs, values, marker="o", markersize=3)
        if key == "F_eigenvalues":
            ax.set_yscale("log", nonpositive="mask")
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
    model = BYOL(args.proj_hidden, args.proj_dim, args.predictor, args.symmetric).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    lr = args.lr * args.batch_size / 256
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    history, step = [], 0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        history, step = checkpoint["history"], checkpoint["step"]
        print(f"resumed {args.resume} at step {step}")
    start_epoch = step // steps_per_epoch
    history = [row for row in history if row["epoch"] <= start_epoch]  # an unfinished epoch is redone
    train_model = torch.compile(model) if args.compile else model

    arch = dict(backbone="resnet18_cifar", backbone_kwargs={}, feature_dim=512, backbone_prefix="backbone.",
                projector_prefix="projector.", projector_layers=PROJECTOR_LAYERS)
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
        epoch_start, epoch_first_step = time.time(), step
        for index in batches:
            lr_now = cosine_schedule(step, total_steps, lr, lr, int(args.warmup_epochs * steps_per_epoch))
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            images = data["train_x"][index]
            view1 = augment(images, VIEWS[0], data["mean"], data["std"])
            view2 = augment(images, VIEWS[1], data["mean"], data["std"])
            with autocast:
                loss, z1, z2 = train_model(view1, view2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            model.update_target(args.ema)
            # Tian et al. Eq. 19: the first batch starts F-hat; --predictor direct sets W_p from it.
            model.update_correlation(z1.detach(), z2.detach(), 0.0 if step == 0 else args.rho)
            if args.predictor == "direct" and step % args.pred_freq == 0:
                model.set_predictor(args.eps)
            loss_sum += loss.detach()
            collapse_sum += collapse_metric(z1.detach())
            step += 1
            done = step - epoch_first_step
            if step % args.log_every == 0 or step == last_step:
                mean_loss = loss_sum.item() / done  # the only host sync, once every log_every steps
                stop_if_not_finite(mean_loss, step, checkpoint_path)
                speed = (step - run_first_step) * args.batch_size / (time.time() - run_start)
                eta = (last_step - step) * args.batch_size / speed
                print(f"epoch {epoch + 1}/{args.epochs} step {step}/{last_step} | loss {mean_loss:.4f} | "
                      f"collapse {collapse_sum.item() / done:.3f} | lr {lr_now:.4f} | {speed:.0f} img/s | "
                      f"eta {format_seconds(eta)}", flush=True)
            if step == last_step:
                break

        rng = rng_state(device)
        epoch_time = time.time() - epoch_start
        row = dict(epoch=epoch + 1, step=step, loss=loss_sum.item() / done, collapse=collapse_sum.item() / done,
                   lr=lr_now, images_per_s=done * args.batch_size / epoch_time,
                   epoch_time_s=epoch_time)
        stop_if_not_finite(row["loss"], step, checkpoint_path)
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs or step == last_step:
            row.update(evaluate(model, data, args))
            print(f"epoch {epoch + 1}/{args.epochs} | loss {row['loss']:.4f} | collapse {row['collapse']:.3f} | "
                  f"erank {row['erank']:.1f} | knn {100 * row['knn_top1']:.2f}% | asymmetry {row['asymmetry']:.3f} | "
                  f"alignment {sum(row['alignment']) / len(row['alignment']):.3f} | "
                  f"{row['images_per_s']:.0f} img/s | {epoch_time:.1f} s/epoch", flush=True)
            history.append(row)
            write_metrics(history, out_dir)
            plot_history(history, out_dir / f"{SCRIPT}.png")
        save_checkpoint(checkpoint_path, dict(
            script=SCRIPT, format=1, epoch=step // steps_per_epoch, step=step, rng=rng, args=vars(args), arch=arch,
            model=model.state_dict(), optimizer=optimizer.state_dict(), data=data_info, history=history,
            F=model.F_hat))

    if history:
        last = history[-1]
        print(f"done: epoch {last['epoch']} kNN top-1 {100 * last['knn_top1']:.2f}% (last epoch), "
              f"collapse {last['collapse']:.3f}, outputs in {out_dir}")
    return history


if __name__ == "__main__":
    main()
