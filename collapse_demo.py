"""Collapse in self-distillation, made visible: the regimes that collapse and those that do not,
trained side by side from the same initialisation on the same batches.

Idea: without negative pairs, mapping every image to one point is a perfect solution to the loss.
Stop-gradient, a predictor, a slow (EMA) teacher, centring and sharpening are each there to keep
training away from it. Each regime below removes or keeps one of them; one figure shows, per
regime, the loss, the collapse metric (std of the l2-normalised outputs x sqrt(d): about 1 healthy,
0 collapsed), the effective rank and kNN accuracy against step, and the final singular-value
spectrum of the embedding the loss acts on, l2-normalised: where collapse shows.

Regimes (--regimes, all by default):
  ViT student and teacher over patch tokens ("Collapse in Self-Supervised Learning", Mashaan's blog):
  the teacher sees a light view, the student a strong one, and the loss is the cross-entropy between
  their softmax outputs, token by token.
    sgd-both            the gradient trains the teacher too: both agree on one token class, loss 0
    frozen-teacher      the teacher keeps its initialisation: a plateau at the loss of its targets
    copy-each-epoch     the teacher is replaced by the student after every epoch
    ema                 DINO's momentum teacher (Caron et al. 2021, Sec. 3.1), no centring, temperature 1
    ema-center-sharpen  DINO's full recipe: momentum teacher, centring and sharpening (Sec. 3.1, 5.3)
  SimSiam on a CIFAR ResNet-18 (Chen & He 2021, Sec. 4) and the symmetric predictor of Tian et al.
  (2021) as Bogatov Wilkman, Miszkurka and Hoeppe reproduced it (KTH, Table 1):
    stop-grad           SimSiam
    no-stop-grad        the gradient flows into both branches (Fig. 2)
    no-predictor        the predictor is the identity (Table 1a)
    fixed-predictor     the predictor keeps its random initialisation (Table 1b)
    symmetric-no-ema    a two-layer predictor with tied layers (W2 = W1^T), the online network as target
    symmetric-ema       the same predictor with an EMA target (BYOL's)

Usage:
    python collapse_demo.py                                     # all regimes, CIFAR-10 in ./data
    python collapse_demo.py --dataset folder --data-dir DIR     # DIR/train/<class>/*, DIR/test/<class>/*
    python collapse_demo.py --regimes stop-grad,no-stop-grad    # a selection
    python collapse_demo.py --dataset synthetic --steps 20 --device cpu   # a quick check, no download
    python collapse_demo.py --img-size 32 --subset 0 --steps 2000 --batch-size 256 \\
        --dim 256 --depth 6 --mlp-dim 1024 --head-hidden 2048   # the blog's ViT, larger runs (GPU)

Result of `--dataset folder` on the CIFAR-10 JPEG copy (2-core CPU, 12 minutes): the table and figure
in the README; every regime lands on the side the literature puts it, except symmetric-no-ema, which
needs the reproduction's length (2,000+ steps to separate from symmetric-ema) and does not collapse in
100 steps.
"""
import argparse
import copy
import errno
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.transforms.v2 import functional as TF

try:
    import fcntl  # POSIX: the lock that keeps two processes out of one run folder
except ImportError:  # Windows: runs go unlocked
    fcntl = None

SCRIPT = Path(__file__).stem

# ------------------------------------------------------------------------------------------------
# Hyperparameters: the recipe in one place. Each entry is the default of the flag of the same name
# (batch_size is --batch-size); the comment says where the value comes from.
# ------------------------------------------------------------------------------------------------
RECIPE = dict(
    img_size=16,            # small enough for the default run to take minutes on a CPU
    subset=2000,            # training images, also the kNN memory bank
    steps=100,              # optimisation steps per regime; the schedules span them
    batch_size=64,
    lr=0.2,                 # SGD of the ResNet-18 regimes, per 256 images, scaled by batch/256
    momentum=0.9,
    weight_decay=5e-4,
    proj_hidden=512,        # the KTH reproduction (Sec. 4): projector and predictor 512 -> 128
    proj_dim=128,
    pred_hidden=512,
    ema_start=0.996,        # EMA momentum of teacher and target at step 0, cosine to 1: DINO's and the KTH report's
    # The blog's ViT is patch 4, width 256, 6 blocks of 4 heads, MLP 1024, head 2048 -> 2048 -> 128,
    # AdamW at 1e-3 for batch 128; these defaults shrink width, depth and head to run on a CPU.
    patch_size=4,
    dim=64,
    depth=2,
    heads=4,
    mlp_dim=256,
    head_hidden=512,
    head_dim=128,           # classes of the per-token softmax
    vit_lr=2e-3,            # AdamW of the ViT regimes, per 256 images, scaled by batch/256
    vit_weight_decay=0.04,  # DINO's
    student_temp=0.1,       # ema-center-sharpen: DINO's temperatures and centre momentum (Sec. 3.1);
    teacher_temp=0.04,      # the other ViT regimes use the blog's temperature 1 on both sides
    center_momentum=0.9,
    knn_k=200,              # the kNN monitor of Wu et al. 2018: 200 neighbours, temperature 0.1
    knn_t=0.1,
)
# Each regime: its family (which model and views), where its targets come from ("teacher"), and
# what else it changes. ViT teachers: trained by the gradient ("sgd"), "frozen", "copy" (student
# copied in after every epoch) or "ema". SimSiam targets: the "online" network itself or an "ema".
REGIMES = {
    "sgd-both": dict(family="vit", teacher="sgd"),
    "frozen-teacher": dict(family="vit", teacher="frozen"),
    "copy-each-epoch": dict(family="vit", teacher="copy"),
    "ema": dict(family="vit", teacher="ema"),
    "ema-center-sharpen": dict(family="vit", teacher="ema", center_sharpen=True),
    "stop-grad": dict(family="siamese", teacher="online", predictor="mlp"),
    "no-stop-grad": dict(family="siamese", teacher="online", predictor="mlp", stop_grad=False),
    "no-predictor": dict(family="siamese", teacher="online", predictor="identity"),
    "fixed-predictor": dict(family="siamese", teacher="online", predictor="fixed"),
    "symmetric-no-ema": dict(family="siamese", teacher="online", predictor="symmetric", reproduction=True),
    "symmetric-ema": dict(family="siamese", teacher="ema", predictor="symmetric", reproduction=True),
}
# The symmetric pair trains as the KTH reproduction did (its Table 1 code): SGD at a constant lr 0.03 for
# batch 128, momentum 0.9, weight decay 4e-4 as an L2 term on the weights but not the biases, the loss the
# SUM of the two negative cosines; projector and predictor 512 -> batch norm without affine -> ReLU -> 128,
# no output batch norm. Its logged F-hat separates the pair after about 5 epochs (~2,000 steps: top
# eigenvalue share 0.91 without EMA, 0.26 with) and completes by epoch 35; the demo's default run is far
# shorter, and its figure says so.
REPRODUCTION = dict(lr=0.06, weight_decay=4e-4, separates_after_steps=2000)  # lr per 256 images
FAMILY_TITLES = {"vit": "ViT student/teacher", "siamese": "SimSiam, ResNet-18"}
# SimSiam on CIFAR (Appendix D): crop scale 0.2-1, flip, colour jitter (0.4, 0.4, 0.4, 0.1) with
# probability 0.8, grayscale 0.2, no blur; both views drawn the same way.
VIEW = dict(crop_scale=(0.2, 1.0), flip=0.5, jitter=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
            grayscale=0.2, solarize=0.0, blur=0.0)
# The blog's ViT pair. The loss compares tokens at the same grid position, so both views keep 80-100%
# of the image; the teacher's light view only crops and flips, the student's strong view adds the
# colour distortions above (in place of the blog's rotation and erasing).
STRONG_VIEW = {**VIEW, "crop_scale": (0.8, 1.0)}
LIGHT_VIEW = {**STRONG_VIEW, "jitter": 0.0, "grayscale": 0.0}
VIEWS = {"vit": (STRONG_VIEW, LIGHT_VIEW), "siamese": (VIEW, VIEW)}  # (student / view 1, teacher / view 2)


# ------------------------------------------------------------------------------------------------
# The regimes: models, losses and their optimisers
# ------------------------------------------------------------------------------------------------
def cifar_resnet18():
    """torchvision's ResNet-18 with the CIFAR stem: a 3x3 stride-1 first convolution, no max-pool,
    no classifier, so a 32x32 image keeps enough resolution and the output is 512-d."""
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def mlp(in_dim, hidden_dim, out_dim, affine=True):
    """BYOL's projector and predictor (Sec. 3.3): Linear -> BatchNorm -> ReLU -> Linear (the reproduction's
    batch norm has no affine parameters)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim, affine=affine),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class TiedPredictor(nn.Module):
    """The symmetric predictor of the KTH reproduction's Table 1: Linear -> BatchNorm (no affine) ->
    ReLU -> Linear, with the second layer tied to the transpose of the first, so that its linear part
    W_p = W2 W1 = W^T W is symmetric. The reproduction ties the layers by replacing both with their
    average after every SGD step; using W = (W1 + W2^T) / 2 in both layers gives W that same update
    (each layer's gradient is half the gradient of W), by construction."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.first = nn.Linear(dim, hidden_dim, bias=False)  # batch norm would subtract a bias again
        self.norm = nn.BatchNorm1d(hidden_dim, affine=False)
        self.second = nn.Linear(hidden_dim, dim, bias=False)

    def tied_weight(self):
        return (self.first.weight + self.second.weight.T) / 2

    def forward(self, z):
        weight = self.tied_weight()
        return F.linear(F.relu(self.norm(F.linear(z, weight))), weight.T)


class SimSiamRegime(nn.Module):
    """SimSiam (Chen & He 2021): backbone -> projector gives z, the predictor maps z of one view onto
    z of the other. The regimes change the predictor, the stop-gradient, or where the target comes
    from: the online network itself or, for symmetric-ema, BYOL's EMA copy of it."""

    def __init__(self, proj_hidden, proj_dim, pred_hidden, predictor="mlp", stop_grad=True, ema=False,
                 reproduction=False):
        super().__init__()
        self.backbone = cifar_resnet18()
        self.projector = mlp(512, proj_hidden, proj_dim, affine=not reproduction)
        self.loss_weight = 1.0 if reproduction else 0.5  # the reproduction sums the two cosines
        if predictor == "identity":
            self.predictor = nn.Identity()
        elif predictor == "symmetric":
            self.predictor = TiedPredictor(proj_dim, pred_hidden)
        else:
            self.predictor = mlp(proj_dim, pred_hidden, proj_dim).requires_grad_(predictor == "mlp")
        self.stop_grad = stop_grad
        self.target = None
        if ema:  # starts as a copy of the online backbone and projector; only the EMA moves it
            self.target = nn.Sequential(copy.deepcopy(self.backbone), copy.deepcopy(self.projector))
            self.target.requires_grad_(False)

    def forward(self, view1, view2):
        """Symmetrised loss (SimSiam Eq. 2) and the projections z of view 1, which the collapse
        metric watches. The views are forwarded separately, so batch norm sees one view at a time."""
        z1, z2 = self.projector(self.backbone(view1)), self.projector(self.backbone(view2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        if self.target is not None:
            with torch.no_grad():  # the target runs in train mode too: its BN uses batch statistics
                t1, t2 = self.target(view1), self.target(view2)
        elif self.stop_grad:  # Eqs. 3-4: the other view's projection is a constant
            t1, t2 = z1.detach(), z2.detach()
        else:
            t1, t2 = z1, z2
        return self.loss_weight * (negative_cosine(p1, t2) + negative_cosine(p2, t1)), z1

    @staticmethod
    def pool(features):
        """kNN features of an image: the backbone's 512-d output."""
        return features

    def embedding(self, features):
        """What the loss acts on: the projection z (compared by cosine, so l2-normalised)."""
        return self.projector(features)

    @torch.no_grad()
    def update_teacher(self, momentum):
        """target <- momentum * target + (1 - momentum) * online, all tensors in one fused call."""
        online = [*self.backbone.parameters(), *self.projector.parameters()]
        torch._foreach_lerp_(list(self.target.parameters()), online, 1 - momentum)


def negative_cosine(prediction, target):
    """SimSiam Eq. 1: minus the cosine similarity of p and z, batch mean (-1 when aligned)."""
    return -F.cosine_similarity(prediction.float(), target.float(), dim=-1).mean()


class ViT(nn.Module):
    """The blog's pre-norm Vision Transformer (Dosovitskiy et al. 2021), without dropout; returns
    the patch tokens after the final norm (the [CLS] token is computed but, as in the blog, unused)."""

    def __init__(self, img_size, patch_size, dim, depth, heads, mlp_dim):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch_size) ** 2, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        block = nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)

    def forward(self, images):
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, tokens, dim)
        x = torch.cat([self.cls_token.expand(len(patches), -1, -1), patches], dim=1) + self.pos_embed
        return self.blocks(x)[:, 1:]


def vit_head(dim, hidden_dim, out_dim):
    """The blog's head, applied to every token: three linear layers, GELU between (DINO's head MLP)."""
    return nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                         nn.Linear(hidden_dim, out_dim))


class StudentTeacher(nn.Module):
    """A student ViT + head learns, on a strong view, the teacher's per-token softmax on a light view.
    The teacher starts as a copy of the student (DINO); the regime decides what moves it. DINO's
    temperatures and centring apply with center_sharpen; the blog's loss is a plain softmax on both
    sides (temperature 1) and no centre."""

    def __init__(self, vit_kwargs, head_hidden, head_dim, teacher="ema", center_sharpen=False, student_temp=0.1,
                 teacher_temp=0.04, center_momentum=0.9):
        super().__init__()
        self.backbone = ViT(**vit_kwargs)
        self.head = vit_head(vit_kwargs["dim"], head_hidden, head_dim)
        self.teacher_backbone = copy.deepcopy(self.backbone).requires_grad_(teacher == "sgd")
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(teacher == "sgd")
        self.teacher_trains = teacher == "sgd"
        self.student_temp, self.teacher_temp = (student_temp, teacher_temp) if center_sharpen else (1.0, 1.0)
        self.centering, self.center_momentum = center_sharpen, center_momentum
        self.register_buffer("center", torch.zeros(head_dim))  # stays 0 without centring

    def forward(self, student_view, teacher_view):
        """Token cross-entropy and the student's token distributions, which the collapse metric watches."""
        student_logits = self.head(self.backbone(student_view))
        with torch.set_grad_enabled(self.teacher_trains):
            teacher_logits = self.teacher_head(self.teacher_backbone(teacher_view))
        loss = token_cross_entropy(student_logits, teacher_logits, self.center, self.student_temp, self.teacher_temp)
        if self.centering:
            self.update_center(teacher_logits)
        return loss, self.distributions(student_logits.detach())

    @staticmethod
    def pool(tokens):
        """kNN features of an image: the mean of its patch tokens."""
        return tokens.mean(dim=1)

    def embedding(self, tokens):
        """What the loss acts on, for the backbone's tokens."""
        return self.distributions(self.head(tokens))

    def distributions(self, logits):
        """What the loss acts on: the student's softmax of every patch token, one row per token.
        Both collapses of DINO Sec. 5.3 bring these rows together: one class everywhere, or uniform."""
        return F.softmax(logits.float() / self.student_temp, dim=-1).flatten(0, 1)

    @torch.no_grad()
    def update_center(self, teacher_logits):
        """DINO Eq. 4: c <- m c + (1 - m) (mean teacher output over the batch and its tokens)."""
        self.center.lerp_(teacher_logits.float().mean(dim=(0, 1)), 1 - self.center_momentum)

    @torch.no_grad()
    def update_teacher(self, momentum):
        """teacher <- momentum * teacher + (1 - momentum) * student; momentum 0 copies the student."""
        student = [*self.backbone.parameters(), *self.head.parameters()]
        teacher = [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()]
        torch._foreach_lerp_(teacher, student, 1 - momentum)


def token_cross_entropy(student_logits, teacher_logits, center, student_temp, teacher_temp):
    """The blog's loss and DINO's Eq. 1-2, token by token: H(P_t, P_s) = -sum_k P_t,k log P_s,k with
    P_t = softmax((t - c) / teacher_temp), P_s = softmax(s / student_temp); mean over images and tokens.
    Its minimum is the teacher's entropy, 0 when teacher and student agree on one class."""
    teacher_probs = F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)
    student_log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs * student_log_probs).sum(dim=-1).mean()


def build_model(spec, args):
    if spec["family"] == "vit":
        vit_kwargs = dict(img_size=args.img_size, patch_size=args.patch_size, dim=args.dim, depth=args.depth,
                          heads=args.heads, mlp_dim=args.mlp_dim)
        return StudentTeacher(vit_kwargs, args.head_hidden, args.head_dim, spec["teacher"],
                              spec.get("center_sharpen", False), args.student_temp, args.teacher_temp,
                              args.center_momentum)
    return SimSiamRegime(args.proj_hidden, args.proj_dim, args.pred_hidden, spec["predictor"],
                         spec.get("stop_grad", True), spec["teacher"] == "ema", spec.get("reproduction", False))


def make_optimizer(model, spec, args):
    """AdamW for the ViT regimes (DINO's optimiser), SGD with momentum for the ResNet-18 ones (SimSiam's);
    each learning rate is given per 256 images and scaled by the batch."""
    trainable = [param for param in model.parameters() if param.requires_grad]
    if spec["family"] == "vit":
        return torch.optim.AdamW(trainable, lr=base_lr(spec, args), weight_decay=args.vit_weight_decay,
                                 fused=fused_optimizer(model))
    if spec.get("reproduction"):  # weight decay on the weights, not on the biases
        groups = [dict(params=[param for param in trainable if param.ndim > 1]),
                  dict(params=[param for param in trainable if param.ndim <= 1], weight_decay=0.0)]
        return torch.optim.SGD(groups, lr=base_lr(spec, args), momentum=args.momentum,
                               weight_decay=REPRODUCTION["weight_decay"], fused=fused_optimizer(model))
    return torch.optim.SGD(trainable, lr=base_lr(spec, args), momentum=args.momentum, weight_decay=args.weight_decay,
                           fused=fused_optimizer(model))


def train_step(model, optimizer, images, spec, lr, ema_momentum, data, compute):
    """One step of a regime: the student's (view 1's) and the teacher's (view 2's) views, the loss, one
    optimiser step, then the teacher update the regime has: DINO's and BYOL's EMA, a copy at the end of
    an epoch (ema_momentum 0), or none. Returns the loss and the collapse metric, as device tensors."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    student_view, teacher_view = VIEWS[spec["family"]]
    view1 = augment(images, student_view, data["mean"], data["std"], compute)
    view2 = augment(images, teacher_view, data["mean"], data["std"], compute)
    with compute.autocast:
        loss, embedding = model(view1, view2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if ema_momentum is not None:
        model.update_teacher(ema_momentum)
    return dict(loss=loss.detach(), collapse=collapse_metric(embedding.detach()))


# ------------------------------------------------------------------------------------------------
# Training loop: every regime for --steps steps, then the figure and the table
# ------------------------------------------------------------------------------------------------
def main(argv=None):
    args = get_args(argv)
    compute = compute_settings(args.device, args.compile)
    data = prepare_data(args, compute.device)
    out_dir, folder_lock, _ = claim_run_folder(args.out_dir, None)
    print(f"{SCRIPT}: {len(data['train_x'])} train / {len(data['test_x'])} test images on {compute.device}, "
          f"{args.steps} steps per regime, regimes {', '.join(args.regimes)}, writing to {out_dir}")
    history, summary = [], {}
    for name in args.regimes:
        rows, spectrum = train_regime(name, args, data, compute)
        history += rows
        last = rows[-1]
        summary[name] = dict(family=REGIMES[name]["family"], loss=last["loss"], collapse=last["collapse"],
                             eval_collapse=last["eval_collapse"], erank=last["erank"], knn_top1=last["knn_top1"],
                             seconds=last["seconds"], spectrum=spectrum)
        write_metrics(history, out_dir)
        write_summary(summary, args, out_dir)
        plot_regimes(history, summary, out_dir / f"{SCRIPT}.png", 1 / len(data["classes"]))

    print(f"{'regime':>18} | {'loss':>8} | collapse | erank | kNN top-1")
    for name, s in summary.items():
        print(f"{name:>18} | {s['loss']:8.4f} | {s['collapse']:8.3f} | {s['erank']:5.1f} | {100 * s['knn_top1']:.2f}%")
    print(f"done: outputs in {out_dir}")
    if folder_lock is not None:
        os.close(folder_lock)
    return summary


def train_regime(name, args, data, compute):
    """Train one regime for --steps steps. Every regime starts from the same seed, so the regimes of
    a family share their initial weights and see the same batches and augmentations. A row of the
    history every --log-every and every --eval-every steps, with the means since the last row."""
    spec = REGIMES[name]
    torch.manual_seed(args.seed)
    model = build_model(spec, args).to(compute.device, memory_format=compute.memory_format)
    optimizer = make_optimizer(model, spec, args)
    if args.compile:
        model.compile(dynamic=False)  # compiles model(...) in place: the state dict keeps its keys
    steps_per_epoch = len(data["train_x"]) // args.batch_size  # the last partial batch is dropped
    history, spectrum, step, epoch, logged_step, sums = [], None, 0, 0, 0, {}
    start = time.time()
    while step < args.steps:
        # All randomness of an epoch follows from (seed, epoch), the same for every regime.
        torch.manual_seed(args.seed * 100_003 + epoch)
        permutation = torch.randperm(len(data["train_x"]), device=compute.device)
        for batch_indices in permutation[:steps_per_epoch * args.batch_size].view(steps_per_epoch, -1):
            # The ViT regimes decay their rate on a cosine; the SimSiam family holds it, as the reproduction.
            lr = cosine_schedule(step, args.steps, base_lr(spec, args), 0.0) if spec["family"] == "vit" \
                else base_lr(spec, args)
            if spec["teacher"] == "ema":  # DINO Sec. 3.1 and BYOL Sec. 3.2: momentum 0.996 -> 1, cosine
                ema_momentum = cosine_schedule(step, args.steps, args.ema_start, 1.0)
            else:  # copy-each-epoch: the student replaces the teacher after the last step of an epoch
                ema_momentum = 0.0 if spec["teacher"] == "copy" and (step + 1) % steps_per_epoch == 0 else None
            metrics = train_step(model, optimizer, data["train_x"][batch_indices], spec, lr, ema_momentum, data,
                                 compute)
            sums = {key: sums.get(key, 0) + value for key, value in metrics.items()}
            step += 1
            evaluate_now = step % args.eval_every == 0 or step == args.steps
            if evaluate_now or step % args.log_every == 0:
                done, logged_step = step - logged_step, step  # means over the steps since the last row
                row = dict(regime=name, step=step, **{key: total.item() / done for key, total in sums.items()},
                           lr=lr, seconds=time.time() - start)
                stop_regime_if_not_finite(row["loss"], step, name)
                sums = {}
                if evaluate_now:
                    metrics, spectrum = evaluate(model, data, args, compute)
                    row.update(metrics)
                    speed = step * args.batch_size / row["seconds"]
                    shown = {key: value for key, value in row.items() if key not in ("step", "lr", "seconds")
                             and isinstance(value, float)}
                    print(progress_line(f"{name:>18} step {step}/{args.steps}", dict(
                        shown, images_per_s=speed, eta=format_seconds((args.steps - step) * args.batch_size / speed))),
                        flush=True)
                history.append(row)
            if step == args.steps:
                break
        epoch += 1
    return history, spectrum


def base_lr(spec, args):
    """The regime's learning rate at the run's batch size: --lr, --vit-lr and the reproduction's are given
    for batch 256."""
    per_256 = args.vit_lr if spec["family"] == "vit" else REPRODUCTION["lr"] if spec.get("reproduction") else args.lr
    return per_256 * args.batch_size / 256


def stop_regime_if_not_finite(loss, step, regime):
    """A NaN/inf loss ends the run; the regimes finished before it keep their outputs."""
    if not math.isfinite(loss):
        fail(f"{regime}: loss is {loss} at step {step}; stopped (earlier regimes are saved); "
             f"try a lower --lr or --vit-lr")


def evaluate(model, data, args, compute):
    """kNN top-1 on backbone features; effective rank, collapse metric and spectrum of the test
    embedding, the (l2-normalised) output the loss acts on."""
    model.eval()
    train_features = model.pool(embed(model.backbone, data["train_x"], data["mean"], data["std"], compute))
    test_output = embed(model.backbone, data["test_x"], data["mean"], data["std"], compute)
    with torch.no_grad():
        test_embedding = model.embedding(test_output)
    model.train()
    metrics = dict(knn_top1=knn_top1(train_features, data["train_y"], model.pool(test_output), data["test_y"],
                                     args.knn_k, args.knn_t),
                   erank=effective_rank(test_embedding), eval_collapse=collapse_metric(test_embedding).item())
    if isinstance(model, SimSiamRegime):
        metrics["f_top_share"] = top_eigenvalue_share(test_embedding)
    return metrics, energy_spectrum(test_embedding).tolist()


def top_eigenvalue_share(z):
    """The share of F-hat's largest eigenvalue in its trace, F-hat the uncentred correlation E[z z^T] of the
    raw projector outputs (here of the test images): what the reproduction logs for the symmetric pair
    (0.91 at epoch 5 and >= 0.98 from epoch 35 without EMA; 0.26 and 0.06-0.16 with it)."""
    correlation = z.double().T @ z.double() / len(z)
    eigenvalues = torch.linalg.eigvalsh(correlation)
    return (eigenvalues[-1] / eigenvalues.sum().clamp_min(1e-300)).item()


def energy_spectrum(z):
    """Squared singular values of the l2-normalised embedding over their sum, largest first: the share
    of the embedding's energy along each principal direction (eigenvalues of its uncentred second
    moment). About 1/d each when the outputs fill the sphere; one share near 1 and the rest near 0
    when every output points the same way."""
    energy = torch.linalg.svdvals(F.normalize(z.float(), dim=1)).square()
    return energy / energy.sum()


def write_summary(summary, args, out_dir):
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(dict(args=vars(args), regimes=summary), indent=1))
    os.replace(tmp, out_dir / "summary.json")


def regime_label(name, rows):
    """A regime's name in the legend; the reproduction's pair, until it has run as long as the reproduction
    needs to separate, says so."""
    steps = max((row["step"] for row in rows), default=0)
    if REGIMES[name].get("reproduction") and steps < REPRODUCTION["separates_after_steps"]:
        return f"{name} (needs the reproduction's length: {REPRODUCTION['separates_after_steps']:,}+ steps)"
    return name


def plot_regimes(history, summary, path, chance):
    """One row per family of regimes, one line per regime: loss, collapse metric, effective rank and
    kNN against step (dashed: chance, 1 / classes), and the final singular values of the test
    embedding (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [family for family in FAMILY_TITLES if any(s["family"] == family for s in summary.values())]
    panels = [("loss", "training loss", None), ("collapse", "collapse metric (1 healthy, 0 collapsed)", (0, 1.1)),
              ("erank", "effective rank of the embedding", None), ("knn_top1", "kNN top-1 (test)", (0, None))]
    fig, axes = plt.subplots(len(families), 5, figsize=(22, 3.9 * len(families)), squeeze=False)
    for row_axes, family in zip(axes, families):
        names = [name for name in summary if summary[name]["family"] == family]
        colours = dict(zip(names, plt.get_cmap("tab10").colors))
        for ax, (key, title, ylim) in zip(row_axes, panels):
            for name in names:
                rows = [row for row in history if row["regime"] == name and key in row]
                ax.plot([row["step"] for row in rows], [row[key] for row in rows], marker="o", markersize=3,
                        color=colours[name], label=regime_label(name, rows))
            ax.set_title(f"{FAMILY_TITLES[family]}: {title}", fontsize=10)
            ax.set_xlabel("step")
            if ylim:
                ax.set_ylim(*ylim)
            ax.grid(alpha=0.3)
        row_axes[1].axhspan(0, 0.1, color="red", alpha=0.08)  # collapsed
        row_axes[3].axhline(chance, color="grey", linestyle="--")
        spectrum_ax = row_axes[4]
        for name in names:
            values = summary[name]["spectrum"]
            spectrum_ax.semilogy(range(1, len(values) + 1), values, color=colours[name], label=name)
        # A fully collapsed embedding has singular values of exactly 0 after the first: keep the
        # axis on the range of the others instead of following them down to the float limit.
        smallest = min(v for name in names for v in summary[name]["spectrum"] if v > 1e-9)
        spectrum_ax.set_ylim(smallest / 2, 1)
        spectrum_ax.set_title(f"{FAMILY_TITLES[family]}: final spectrum", fontsize=10)
        spectrum_ax.set_xlabel("direction of the l2-normalised test embedding")
        spectrum_ax.set_ylabel("share of the energy (singular value squared)", fontsize=8)
        spectrum_ax.grid(alpha=0.3)
        row_axes[0].legend(fontsize=8)
    fig.suptitle(f"{SCRIPT}: {path.parent.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser():
    """The demo's flags; the recipe's defaults come from RECIPE."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--dataset", default="cifar10", choices=["cifar10", "cifar100", "folder", "synthetic"], help="image source")
    add("--data-dir", default="./data", help="download folder (cifar) or DIR with train/ and test/ (folder)")
    add("--img-size", type=number_type(int, lambda value: value >= 8, ">= 8"), help="images are resized once to this")
    add("--subset", type=non_negative_int, help="train on a random N training images, the kNN memory bank too (0: all)")
    add("--regimes", default=",".join(REGIMES), help="comma-separated, from: " + ", ".join(REGIMES))
    add("--steps", type=positive_int, help="optimisation steps per regime; the schedules span them")
    add("--batch-size", type=positive_int, help="images per step")
    add("--lr", type=positive_float, help="SGD learning rate of the ResNet-18 regimes for batch 256, scaled")
    add("--weight-decay", type=non_negative_float, help="of the SGD (ResNet-18) regimes")
    add("--momentum", type=fraction_below_one, help="of the SGD (ResNet-18) regimes")
    add("--eval-every", type=positive_int, default=25, help="steps between kNN evaluations")
    add("--log-every", type=positive_int, default=10, help="steps between logged points of loss and collapse")
    add("--knn-k", type=positive_int, help="neighbours that vote in the kNN monitor")
    add("--knn-t", type=positive_float, help="temperature of the kNN vote weights")
    add("--device", default="auto", help="auto, cuda, mps or cpu")
    add("--compile", action="store_true", help="torch.compile the model's forward pass and the views' pixel work")
    add("--seed", type=int, default=0, help="seed of the weights, the subset and every batch")
    add("--out-dir", default=None, help="run folder (default: runs/<script>-<time>)")
    add("--patch-size", type=positive_int, help="ViT patch size")
    add("--dim", type=positive_int, help="ViT width")
    add("--depth", type=positive_int, help="ViT blocks")
    add("--heads", type=positive_int, help="attention heads per block")
    add("--mlp-dim", type=positive_int, help="hidden width of the blocks' MLP")
    add("--head-hidden", type=positive_int, help="hidden width of the ViT head")
    add("--head-dim", type=positive_int, help="classes of the per-token softmax")
    add("--vit-lr", type=positive_float, help="AdamW learning rate of the ViT regimes for batch 256, scaled")
    add("--vit-weight-decay", type=non_negative_float, help="AdamW weight decay")
    add("--student-temp", type=positive_float, help="student temperature of ema-center-sharpen")
    add("--teacher-temp", type=positive_float, help="teacher temperature of ema-center-sharpen")
    add("--center-momentum", type=fraction, help="EMA momentum of the centre (ema-center-sharpen)")
    add("--proj-hidden", type=positive_int, help="hidden width of the projector")
    add("--proj-dim", type=positive_int, help="output width of the projector and predictor")
    add("--pred-hidden", type=positive_int, help="hidden width of the predictor")
    add("--ema-start", type=fraction, help="EMA momentum of the teacher/target at step 0 (cosine to 1)")
    parser.set_defaults(**RECIPE, stream=False)  # the demo indexes its decoded images: it never streams
    return parser


def get_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.regimes = [name.strip() for name in args.regimes.split(",") if name.strip()]
    unknown = [name for name in args.regimes if name not in REGIMES]
    if unknown or not args.regimes:
        parser.error(f"--regimes: {'unknown ' + ', '.join(unknown) if unknown else 'none given'}; "
                     f"choose from {', '.join(REGIMES)}")
    if len(set(args.regimes)) != len(args.regimes):
        parser.error("--regimes names a regime twice")
    if any(REGIMES[name]["family"] == "vit" for name in args.regimes):
        if args.dim % args.heads:
            parser.error(f"--dim {args.dim} must be a multiple of --heads {args.heads}")
        if args.img_size % args.patch_size:
            parser.error(f"--patch-size {args.patch_size} must divide --img-size {args.img_size}")
    return args


# ================================================================================================
# Shared plumbing: identical in every training script (tests/test_shared.py checks it), and
# skippable on a first read. Command line, data, augmentation, metrics, kNN monitor, checkpoints,
# plots.
# ================================================================================================
def fail(message):
    """Stop with a one-line error and a non-zero exit code (in a data-parallel run every rank stops, rank 0
    alone says why: the ranks take their decisions together)."""
    raise SystemExit(f"{SCRIPT}.py: error: {message}" if is_main_rank() else 1)


def log(line):
    """Print a progress or status line: in a data-parallel run, rank 0 alone prints."""
    if is_main_rank():
        print(line, flush=True)


def number_type(cast, accepts, rule):
    """An argparse type: a finite number of type `cast` for which accepts(value) holds (NaN never does)."""
    def parse(text):
        value = cast(text)  # a ValueError becomes argparse's own "invalid int value" message
        if not (math.isfinite(value) and accepts(value)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = cast.__name__
    return parse


positive_int = number_type(int, lambda value: value > 0, "> 0")
non_negative_int = number_type(int, lambda value: value >= 0, ">= 0")
positive_float = number_type(float, lambda value: value > 0, "> 0")
non_negative_float = number_type(float, lambda value: value >= 0, ">= 0")
fraction = number_type(float, lambda value: 0 <= value <= 1, "in [0, 1]")
fraction_below_one = number_type(float, lambda value: 0 <= value < 1, "in [0, 1)")


def compute_settings(device_name, compile_views=False):
    """Where and how the run computes, decided once: bf16 autocast on CUDA (tensor cores), float32
    elsewhere; channels-last images on CUDA and CPU (the layout of cuDNN's and oneDNN's fastest
    convolutions; README, Benchmarks), the default layout on MPS; the views' pixel work compiled with
    --compile (one graph per view shape: dynamic=False, so a run never recompiles). Started by torchrun
    (WORLD_SIZE > 1), the process is one rank of a data-parallel run: it joins the process group (NCCL on
    CUDA, one GPU per rank, cuda:LOCAL_RANK; gloo on CPU)."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device_name, int(os.environ.get("LOCAL_RANK", 0)))
    if world_size > 1 and not dist.is_initialized():
        if device.type == "mps":
            fail("a data-parallel run needs CUDA or the CPU, not MPS")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.backends.cudnn.benchmark = True
    return SimpleNamespace(device=device, rank=rank, world_size=world_size,
                           autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
                           memory_format=torch.contiguous_format if device.type == "mps" else torch.channels_last,
                           transform_view=torch.compile(transform_view, dynamic=False) if compile_views
                           else transform_view)


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


# --- data parallel (torchrun): what the ranks share, and the one rank that writes ----------------
def is_main_rank():
    """Rank 0 of a data-parallel run (torchrun sets RANK), or the one process of any other run."""
    return int(os.environ.get("RANK", 0)) == 0


def own_share(rows, compute, copies=1):
    """This rank's share of rows laid out as `copies` stacked copies of the global batch: of each copy, the
    rank's contiguous block of batch / world_size rows (in one process, all rows)."""
    return rows.unflatten(0, (copies, compute.world_size, -1))[:, compute.rank].flatten(0, 1)


def average_over_ranks(tensor):
    """The tensor averaged over the ranks, in place (an all-reduce; in one process, the tensor itself)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def fused_optimizer(model):
    """One fused kernel per optimiser step where the device has it (CUDA and CPU)."""
    return next(model.parameters()).device.type in ("cuda", "cpu")


# What a run writes into its folder; a folder holding any of them belongs to a run.
RUN_OUTPUTS = ("checkpoint.pt", "metrics.jsonl", f"{SCRIPT}.png")


def claim_run_folder(out_dir, resume):
    """The run's folder, held by this process alone until it ends: a new run never writes where another
    run's outputs are, a resumed one only into its own folder, and two processes never share one (an
    exclusive lock on the folder, which the system drops when the process ends, however it ends). A new
    default folder is created exclusively, with -2, -3, ... if another run took the name in the same
    second. Leftover temporary files of a write that was killed are removed. Returns the folder, its
    lock, and whether this run created it."""
    created = True
    if out_dir is None and resume is None:
        stamp, number = time.strftime("%Y%m%d-%H%M%S"), 1
        folder = Path("runs") / f"{SCRIPT}-{stamp}"
        while True:
            try:
                folder.mkdir(parents=True)
                break
            except FileExistsError:
                number += 1
                folder = Path("runs") / f"{SCRIPT}-{stamp}-{number}"
            except OSError as error:
                fail(f"cannot create the run folder {folder} ({error.strerror})")
    else:
        folder = Path(out_dir) if out_dir is not None else Path(resume).parent
        created = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            fail(f"cannot create the run folder {folder} ({error.strerror or error})")
    if not os.access(folder, os.W_OK):
        fail(f"cannot write to the run folder {folder} (permission denied)")
    own = resume is not None and Path(resume).resolve().parent == folder.resolve()
    found = [name for name in RUN_OUTPUTS if (folder / name).exists()]
    if found and not own:
        resume_hint = (f"continue that run with --resume {folder / 'checkpoint.pt'}, or "
                       if "checkpoint.pt" in found else "")
        fail(f"{folder} holds another run's outputs ({', '.join(found)}); {resume_hint}choose another --out-dir")
    lock = None
    if fcntl:  # an open descriptor of the folder, locked until this process closes it or ends
        lock = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            fail(f"another process is writing to {folder}; wait for it to end or choose another --out-dir")
    for stale in folder.glob("*.tmp"):
        stale.unlink()
    return folder, lock, created


def progress_line(head, values):
    """The one format of every progress line: `head | name value | ...`."""
    formats = dict(loss="loss {:.4f}", knn_top1="knn {:.2%}", erank="erank {:.1f}", lr="lr {:.3g}",
                   images_per_s="{:.0f} img/s", epoch_time_s="{:.1f} s/epoch", eta="eta {}")
    return " | ".join([head] + [formats.get(name, name + " {:.3f}").format(value) for name, value in values.items()])


def format_seconds(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


# --- data: every split decoded once into a uint8 tensor (N, 3, H, W) on the training device, or streamed
def prepare_data(args, device):
    # Data-parallel: the first rank of each machine loads (and downloads) the data first, the others after it.
    first_on_machine = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if dist.is_initialized() and not first_on_machine:
        dist.barrier()
    data = load_dataset(args, device)
    if dist.is_initialized() and first_on_machine:
        dist.barrier()
    if len(data["train_x"]) < args.batch_size:
        fail(f"--batch-size {args.batch_size} is larger than the {len(data['train_x'])} training images")
    data["mean"], data["std"] = channel_statistics(data["train_x"][:10000])
    data["fingerprint"] = fingerprint(data)
    same = data["labelled_x"] is data["train_x"]  # all but STL-10: the labelled images are the training images
    data = {key: value.to(device) if hasattr(value, "to") else value for key, value in data.items()
            if not (same and key.startswith("labelled_"))}
    if same:
        data["labelled_x"], data["labelled_y"] = data["train_x"], data["train_y"]
    return data


def channel_statistics(images):
    """The per-channel mean and standard deviation of uint8 images, as (1, 3, 1, 1) float tensors in [0, 1]
    units: summed in float64, 1000 images at a time, so that no float copy of the images is made."""
    sums, count = torch.zeros(2, 3, dtype=torch.float64), 0
    for chunk in images.split(1000):
        pixels = chunk.to("cpu", torch.float64).div_(255).transpose(0, 1).flatten(1)  # (3, pixels)
        sums += torch.stack([pixels.sum(dim=1), pixels.square().sum(dim=1)])
        count += pixels.shape[1]
    mean = sums[0] / count
    std = ((sums[1] - count * mean.square()) / (count - 1)).sqrt()
    return mean.float().view(1, 3, 1, 1), std.float().view(1, 3, 1, 1)


def subset_indices(num_images, args):
    """The train images of --subset N: the first N of a permutation drawn from --seed (None: all)."""
    if args.subset > num_images:
        fail(f"--subset {args.subset} is larger than the {num_images} images of the train split")
    if not args.subset:
        return None
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(args.seed))[:args.subset]


def fingerprint(data):
    """A hash of the splits' pixels and labels: what a resumed run checks it trains on the same images. A
    streamed folder's pixels are not at hand, so its hash is of the files' names and sizes ("files:...")."""
    digest = hashlib.blake2b(digest_size=8)
    names = ["train_x", "train_y", "test_x", "test_y"]
    if data["labelled_x"] is not data["train_x"]:
        names += ["labelled_x", "labelled_y"]
    for name in names:
        if isinstance(data[name], ImageFiles):
            digest.update("\n".join(f"{path} {os.path.getsize(path)}" for path in data[name].paths).encode())
        else:
            digest.update(data[name].contiguous().numpy().tobytes())
    return ("files:" if isinstance(data["train_x"], ImageFiles) else "") + digest.hexdigest()


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


# --- augmentation: batched on the device, every random parameter drawn per image ------------------
CROP_RATIO = (3 / 4, 4 / 3)


def augment(images, view, mean, std, compute, out_size=None, copies=1):
    """`copies` random views (DINO's local crops; else one) of every image at out_size x out_size (default:
    the images' size), normalised, in the run's memory layout, stacked copy by copy: the random parameters
    drawn here, per image, the pixel work in compute.transform_view (transform_view, compiled with
    --compile). In a data-parallel run `images` are the rank's share of the global batch; the parameters
    are drawn for the whole global batch, on every rank alike, and each rank keeps those of its share: the
    ranks together make exactly the views of one process with the same --batch-size and seed."""
    batch, _, height, width = images.shape
    params = sample_view_params(copies * compute.world_size * batch, height, width, view, images.device)
    params = {name: own_share(value, compute, copies) for name, value in params.items()}
    images = images.repeat(copies, 1, 1, 1) if copies > 1 else images
    return compute.transform_view(images, params, mean, std, out_size or height, compute.memory_format)


def transform_view(images, params, mean, std, out_size, memory_format):
    """A view's pixel work given its parameters: crop, flip, colour jitter, grayscale, solarization, blur,
    then normalisation. A view with blur blurs last, after solarization where DINO and BYOL blur first:
    the two differ only for the images that draw both (2% of BYOL's and DINO's second views)."""
    x = apply_view(images, params, out_size)
    if "blur" in params:
        blurred = gaussian_blur(x, params["blur_sigma"], blur_kernel_size(out_size))
        x = torch.where(params["blur"].view(-1, 1, 1, 1), blurred, x)
    return x.sub_(mean).div_(std).contiguous(memory_format=memory_format)


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
    params = dict(crop=crop, flip=torch.rand(batch, device=device) < view["flip"], jitter=jitter,
                  factors=factors, hue_shift=hue_shift,
                  jitter_order=torch.rand(batch, 4, device=device).argsort(dim=1),  # a random order per image
                  grayscale=torch.rand(batch, device=device) < view["grayscale"],
                  solarize=torch.rand(batch, device=device) < view["solarize"])
    if view["blur"]:
        params["blur"], params["blur_sigma"] = sample_blur(batch, view, height, device)
    return params


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


def apply_view(images, params, out_size):
    """uint8 (B, 3, H, W) on the device -> augmented float images in [0, 1]."""
    x = crop_flip_resize(images.float().div_(255), params["crop"], params["flip"], out_size)
    x = color_jitter(x, params["factors"], params["hue_shift"], params["jitter_order"], params["jitter"])
    x = torch.where(params["grayscale"].view(-1, 1, 1, 1), rgb_to_grayscale(x).expand_as(x), x)
    # Solarize at 0.5 (invert every value above it) is min(x, 1 - x).
    return torch.where(params["solarize"].view(-1, 1, 1, 1), torch.minimum(x, 1 - x), x)


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


def color_jitter(images, factors, hue_shift, jitter_order, jitter):
    """ColorJitter with a random order per image. Brightness, contrast and saturation are blends;
    hue is not, so it is applied once for the whole batch and every blend is placed before or
    after it according to the image's own order."""
    hue_position = (jitter_order == 3).int().argmax(dim=1)
    for before_hue, positions in ((True, range(3)), (False, range(1, 4))):
        for position in positions:
            op = jitter_order[:, position]
            due = position < hue_position if before_hue else position > hue_position
            factor = torch.where(due, factors.gather(1, op.unsqueeze(1)).squeeze(1), 1.0)
            images = blend(images, op, factor)
        if before_hue:
            images = torch.where(jitter.view(-1, 1, 1, 1), adjust_hue(images, hue_shift), images)
    return images


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
    # Red, green and blue peak at sextants 0, 2 and 4 (arange fills on the device: no host copy).
    peaks = torch.arange(0, 6, 2, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    distance = (sextant - peaks).abs()
    ramp = (2 - torch.minimum(distance, 6 - distance)).clamp_(0, 1)
    return torch.addcmul(minc, spread, ramp)


def rgb_to_grayscale(images):
    """ITU-R 601-2 luma, as torchvision: (B, 3, H, W) -> (B, 1, H, W)."""
    r, g, b = images.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)
# The papers' blur sigmas (SimCLR, BYOL, DINO: 0.1-2 px) are in pixels of a 224-px image.
BLUR_SIGMA_IMAGE_SIZE = 224


def sample_blur(batch, view, image_size, device):
    """Per image: whether it is blurred (probability view["blur"]) and its sigma, uniform in view["blur_sigma"]
    scaled from a 224-px image to image_size: the same blur relative to the image, so at 32 px it is nearly
    none (sigma at most 0.29 px), as the CIFAR recipes of lightly and solo-learn have it off."""
    scale = image_size / BLUR_SIGMA_IMAGE_SIZE
    return (torch.rand(batch, device=device) < view["blur"],
            torch.empty(batch, device=device).uniform_(view["blur_sigma"][0] * scale, view["blur_sigma"][1] * scale))


def blur_kernel_size(crop_size):
    """SimCLR's and BYOL's Gaussian kernel, 10% of the crop (23 taps at 224 px), odd, at least 3 taps."""
    return max(3, 2 * round((0.1 * crop_size - 1) / 2) + 1)


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


# --- schedules, collapse metrics and the kNN monitor ----------------------------------------------
def cosine_schedule(step, total_steps, start, end, warmup_steps=0):
    """Linear warm-up from 0 to `start`, then a half cosine from `start` to `end`."""
    if step < warmup_steps:
        return start * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


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


# --- checkpoints, metrics and plots ---------------------------------------------------------------
def write_atomically(path, write):
    """write(tmp), then rename tmp to path: a run killed mid-write keeps the previous file. A write that
    fails (a full disk) removes its partial file and stops the run, saying where the last good
    checkpoint is."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        full = getattr(error, "errno", None) == errno.ENOSPC or shutil.disk_usage(path.parent).free < 2**20
        tmp.unlink(missing_ok=True)
        checkpoint = path.parent / "checkpoint.pt"
        kept = f"the last good checkpoint is {checkpoint}" if checkpoint.exists() else "no checkpoint was written"
        if full:
            fail(f"no space left on {mount_point(path)} writing {path}; {kept}")
        fail(f"cannot write {path} ({type(error).__name__}: {error}); {kept}")


def mount_point(path):
    path = path.resolve().parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def write_metrics(history, out_dir):
    write_atomically(out_dir / "metrics.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(row) + "\n"
                                                                                  for row in history)))


if __name__ == "__main__":
    main()
