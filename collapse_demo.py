"""Collapse in self-distillation, made visible: the regimes that collapse and those that do not, trained side
by side from the same initialisation on the same batches.

Idea: without negative pairs, mapping every image to one point is a perfect solution of the loss.
Stop-gradient, a predictor, a slow (EMA) teacher, centring and sharpening each keep training away from it.
Each regime below removes or keeps one of them; one figure shows the loss, the collapse metric (about 1
healthy, 0 collapsed), the effective rank, the kNN accuracy and the final spectrum of the loss's embedding.

Regimes (--regimes stop-grad,no-stop-grad names some; all by default):
  ViT student and teacher over patch tokens ("Collapse in Self-Supervised Learning", Mashaan's blog): the
  teacher sees a light view, the student a strong one, and the loss is the cross-entropy between their
  softmax outputs, token by token.
    sgd-both            the gradient trains the teacher too: both agree on one token class, loss 0
    frozen-teacher      the teacher keeps its initialisation: a plateau at the loss of its targets
    copy-each-epoch     the teacher is replaced by the student after every epoch
    ema                 DINO's momentum teacher (Caron et al. 2021, Sec. 3.1), no centring, temperature 1
    ema-center-sharpen  DINO's full recipe: momentum teacher, centring and sharpening (Sec. 3.1, 5.3)
  SimSiam on a CIFAR ResNet-18 (Chen & He 2021, Sec. 4) and the symmetric predictor of Tian et al. 2021 as
  Bogatov Wilkman, Miszkurka and Hoeppe reproduced it (KTH, Table 1):
    stop-grad           SimSiam
    no-stop-grad        the gradient flows into both branches (Fig. 2)
    no-predictor        the predictor is the identity (Table 1a)
    fixed-predictor     the predictor keeps its random initialisation (Table 1b)
    symmetric-no-ema    a two-layer predictor with tied layers (W2 = W1^T), the online network as target
    symmetric-ema       the same predictor with an EMA target (BYOL's)

Usage:
    python collapse_demo.py                                     # all regimes, CIFAR-10 in ./data
    python collapse_demo.py --dataset folder --data-dir DIR     # DIR/{train,test}/<class>/*
    python collapse_demo.py --dataset synthetic --steps 20 --device cpu   # a quick check, no download

Result of `--dataset folder` on the CIFAR-10 JPEG copy (2-core CPU, 11 minutes): docs/results.md. Every regime
lands on the side the literature puts it, but symmetric-no-ema, which needs 2,000+ steps (see REPRODUCTION).
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from matplotlib.figure import Figure
from torchvision.transforms.v2 import functional as TF

# ===== Hyperparameters: each entry is the default of the flag of the same name, with its source ===
RECIPE = dict(
    img_size=16,            # small enough for the default run to take minutes on a CPU
    subset=2000,            # training images, also the kNN memory bank
    steps=100,              # optimisation steps per regime; the schedules span them
    batch_size=64,
    lr=0.2,                 # SGD of the ResNet-18 regimes, per 256 images, held constant (the reproduction's)
    momentum=0.9,
    weight_decay=5e-4,
    proj_hidden=512, proj_dim=128, pred_hidden=512,  # the KTH reproduction (Sec. 4): both heads 512 -> 128
    ema_start=0.996,        # the teacher's and target's EMA momentum, cosine to 1: DINO's, the KTH report's
    # The blog's ViT is patch 4, width 256, 6 blocks of 4 heads, MLP 1024, head 2048 -> 2048 -> 128, AdamW at
    # 1e-3 for batch 128; these defaults shrink width, depth and head to run on a CPU.
    patch_size=4, dim=64, depth=2, heads=4, mlp_dim=256, head_hidden=512,
    head_dim=128,           # classes of the per-token softmax
    vit_lr=2e-3,            # AdamW of the ViT regimes, per 256 images, a cosine to 0
    vit_weight_decay=0.04,  # DINO's
    student_temp=0.1,       # ema-center-sharpen: DINO's temperatures and centre momentum (Sec. 3.1); the
    teacher_temp=0.04,      # other ViT regimes use the blog's temperature 1 on both sides
    center_momentum=0.9,
)
# Each regime: its family (model and views), where its targets come from ("teacher") and what else it changes.
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
# The symmetric pair trains as the KTH reproduction's Table 1 code: SGD at a constant lr 0.03 for batch 128,
# weight decay 4e-4 on weights only, the SUM of both negative cosines; heads 512, affine-free BN, ReLU, 128.
REPRODUCTION = dict(lr=0.06, weight_decay=4e-4, separates_after_steps=2000)  # lr per 256 images
# SimSiam on CIFAR (Appendix D), both views alike. The blog's ViT pair compares tokens at the same grid
# position, so both its views keep 80-100% of the image; the teacher's light view only crops and flips, the
# student's strong view adds the colour distortions (in place of the blog's rotation and erasing).
VIEW = dict(crop_scale=(0.2, 1.0), flip=0.5, jitter=0.8, brightness=0.4, contrast=0.4, saturation=0.4,
            hue=0.1, grayscale=0.2, solarize=0.0, blur=0.0)
STRONG_VIEW = {**VIEW, "crop_scale": (0.8, 1.0)}
VIEWS = dict(vit=(STRONG_VIEW, {**STRONG_VIEW, "jitter": 0.0, "grayscale": 0.0}), siamese=(VIEW, VIEW))

# ===== The regimes: models, losses, optimisers, one training step and the evaluation ==============
def resnet18(img_size):
    net = torchvision.models.resnet18()
    if img_size < LARGE_IMAGE_SIZE:  # the CIFAR stem: a 3x3 stride-1 conv, no max-pool
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()  # no classifier: 512-d features
    return net

def mlp(in_dim, hidden_dim, out_dim, affine=True):
    """BYOL's projector and predictor: Linear -> BN -> ReLU -> Linear (affine-free BN: the reproduction)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim, affine=affine),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

class TiedPredictor(nn.Module):
    """The KTH reproduction's symmetric predictor (Table 1): Linear -> affine-free BatchNorm -> ReLU ->
    Linear, the second the first's transpose (W^T W is symmetric). It ties the layers by averaging them after
    each SGD step; W = (W1 + W2^T) / 2 in both layers gets that update (each layer's gradient is half W's)."""
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
    """SimSiam: backbone -> projector gives z; the predictor maps one view's z onto the other's (Eqs. 1-2)."""
    def __init__(self, spec, args):
        super().__init__()
        predictor, reproduction = spec["predictor"], spec.get("reproduction", False)
        self.backbone = resnet18(args.img_size)
        self.projector = mlp(512, args.proj_hidden, args.proj_dim, affine=not reproduction)
        self.loss_weight = 1.0 if reproduction else 0.5  # the reproduction sums the two cosines
        if predictor == "identity":
            self.predictor = nn.Identity()
        elif predictor == "symmetric":
            self.predictor = TiedPredictor(args.proj_dim, args.pred_hidden)
        else:
            self.predictor = mlp(args.proj_dim, args.pred_hidden, args.proj_dim)
            self.predictor.requires_grad_(predictor == "mlp")  # "fixed" keeps its initialisation
        self.stop_grad = spec.get("stop_grad", True)
        self.student = nn.Sequential(self.backbone, self.projector)  # online; an EMA teacher is BYOL's target
        self.teacher = copy.deepcopy(self.student).requires_grad_(False) if spec["teacher"] == "ema" else None

    def forward(self, view1, view2):
        """The symmetrised loss (SimSiam Eq. 2) and the projections z of view 1, which the collapse metric
        watches. The views go through one at a time, so that batch norm sees one view's statistics."""
        z1, z2 = self.student(view1), self.student(view2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        if self.teacher is not None:
            with torch.no_grad():  # the teacher runs in train mode too: its batch norm uses batch statistics
                t1, t2 = self.teacher(view1), self.teacher(view2)
        else:  # Eqs. 3-4: with stop-gradient, the other view's projection is a constant
            t1, t2 = (z1.detach(), z2.detach()) if self.stop_grad else (z1, z2)
        cosines = F.cosine_similarity(p1.float(), t2.float()) + F.cosine_similarity(p2.float(), t1.float())
        return -self.loss_weight * cosines.mean(), z1

    def embedding(self, features):
        """The kNN features (the backbone's) and the embedding the loss acts on, the projection z."""
        return features, self.projector(features)

class ViT(nn.Module):
    """The blog's pre-norm Vision Transformer (Dosovitskiy et al. 2021), without dropout: the patch tokens
    after the final norm (the [CLS] token is computed but, as in the blog, unused)."""
    def __init__(self, img_size, patch_size, dim, depth, heads, mlp_dim):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, 1, dim), std=0.02))
        tokens = 1 + (img_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.zeros(1, tokens, dim), std=0.02))
        block = nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)

    def forward(self, images):
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, tokens, dim)
        x = torch.cat([self.cls_token.expand(len(patches), -1, -1), patches], dim=1) + self.pos_embed
        return self.blocks(x)[:, 1:]

class StudentTeacher(nn.Module):
    """A student ViT + head (the blog's: DINO's three linear layers, GELU) learns, on a strong view, the
    teacher's per-token softmax on a light view. The teacher starts as a copy; the regime moves it."""
    def __init__(self, spec, args):
        super().__init__()
        self.backbone = ViT(args.img_size, args.patch_size, args.dim, args.depth, args.heads, args.mlp_dim)
        self.head = nn.Sequential(nn.Linear(args.dim, args.head_hidden), nn.GELU(), nn.Linear(
            args.head_hidden, args.head_hidden), nn.GELU(), nn.Linear(args.head_hidden, args.head_dim))
        self.student = nn.Sequential(self.backbone, self.head)
        self.teacher = copy.deepcopy(self.student).requires_grad_(spec["teacher"] == "sgd")
        self.centering, self.center_momentum = spec.get("center_sharpen", False), args.center_momentum
        temperatures = (args.student_temp, args.teacher_temp) if self.centering else (1.0, 1.0)
        self.student_temp, self.teacher_temp = temperatures  # without sharpening, the blog's 1 on both sides
        self.register_buffer("center", torch.zeros(args.head_dim))  # stays 0 without centring

    def forward(self, student_view, teacher_view):
        """The token cross-entropy (the blog's loss; DINO's Eqs. 1-2, token by token) H(P_t, P_s), with P_t =
        softmax((t - c) / teacher_temp) and P_s = softmax(s / student_temp); the student's distributions."""
        student = self.student(student_view).float()
        teacher = self.teacher(teacher_view).float()  # a graph only when the regime trains it (sgd-both)
        teacher_probs = F.softmax((teacher - self.center) / self.teacher_temp, dim=-1)
        loss = -(teacher_probs * F.log_softmax(student / self.student_temp, dim=-1)).sum(dim=-1).mean()
        if self.centering:  # DINO Eq. 4, over the batch and its tokens
            self.center.lerp_(teacher.detach().mean(dim=(0, 1)), 1 - self.center_momentum)
        return loss, F.softmax(student.detach() / self.student_temp, dim=-1).flatten(0, 1)

    def embedding(self, tokens):
        """The kNN features (the mean patch token) and the embedding the loss acts on: the student's softmax
        of every token, a row per token. Both collapses of DINO Sec. 5.3 bring these rows together."""
        distributions = F.softmax(self.head(tokens).float() / self.student_temp, dim=-1)
        return tokens.mean(dim=1), distributions.flatten(0, 1)

def make_optimizer(model, spec, args):
    """AdamW for the ViT regimes (DINO's), SGD with momentum for the ResNet-18 ones (SimSiam's; the
    reproduction's weight decay on the weights alone). Every rate is per 256 images."""
    trainable = [param for param in model.parameters() if param.requires_grad]
    if spec["family"] == "vit":
        lr = args.vit_lr * args.batch_size / 256
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=args.vit_weight_decay)
    reproduction = spec.get("reproduction", False)
    lr = (REPRODUCTION["lr"] if reproduction else args.lr) * args.batch_size / 256
    groups = [dict(params=[param for param in trainable if param.ndim > 1 or not reproduction]),
              dict(params=[param for param in trainable if param.ndim == 1 and reproduction], weight_decay=0)]
    decay = REPRODUCTION["weight_decay"] if reproduction else args.weight_decay
    return torch.optim.SGD(groups, lr=lr, momentum=args.momentum, weight_decay=decay)

def train_step(model, optimizer, images, spec, momentum, ctx):
    """One step of a regime: the student's (view 1) and teacher's (view 2) views, the loss, an optimiser step,
    then the teacher update it has: DINO's and BYOL's EMA, a copy after an epoch (momentum 0), or none."""
    view1, view2 = (augment(images, view, ctx) for view in VIEWS[spec["family"]])
    with ctx.autocast:
        loss, embedding = model(view1, view2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if momentum is not None:
        with torch.no_grad():
            torch._foreach_lerp_([*model.teacher.parameters()], [*model.student.parameters()], 1 - momentum)
    return dict(loss=loss.detach(), collapse=collapse_metric(embedding.detach()))

@torch.no_grad()
def evaluate(model, data, ctx):
    """Effective rank, collapse metric and energy spectrum of the test embedding the loss acts on (squared
    singular values of the l2-normalised embedding over their sum: about 1/d each when it fills the sphere,
    one near 1 when it points one way), kNN top-1; for SimSiam, the top eigenvalue share of F-hat = E[z z^T]:
    the reproduction's measure (0.91 at epoch 5, >= 0.98 from epoch 35 without EMA; 0.26, 0.06-0.16 with)."""
    bank, _ = model.embedding(embed(model.backbone, data["labelled_x"], ctx))
    features, z = model.embedding(embed(model.backbone, data["test_x"], ctx))
    metrics = dict(knn_top1=knn_top1(bank, data["labelled_y"], features, data["test_y"]),
                   erank=effective_rank(z), eval_collapse=collapse_metric(z).item())
    if isinstance(model, SimSiamRegime):
        eigenvalues = torch.linalg.eigvalsh(z.double().T @ z.double() / len(z))
        metrics["f_top_share"] = (eigenvalues[-1] / eigenvalues.sum()).item()
    energy = torch.linalg.svdvals(F.normalize(z.float(), dim=1)).square()
    return metrics, (energy / energy.sum()).tolist()

# ===== The training loop: every regime for --steps steps, then the figure and the table ===========
def main(argv=None):
    args = build_parser().parse_args(argv)
    args.regimes = args.regimes.split(",")
    if set(args.regimes) - set(REGIMES) or len(set(args.regimes)) < len(args.regimes):
        fail(f"--regimes: name distinct regimes of {', '.join(REGIMES)}")
    vit = any(REGIMES[name]["family"] == "vit" for name in args.regimes)
    if vit and (args.dim % args.heads or args.img_size % args.patch_size):
        fail(f"--dim {args.dim} must be a multiple of --heads {args.heads}, and --patch-size "
             f"{args.patch_size} divide --img-size {args.img_size}")
    ctx = setup(args)
    data = load_data(args, ctx.device)
    if not len(data["labelled_y"]):  # kNN top-1 is one of the four measures
        fail(f"the demo needs labelled images, and {args.data_dir} has no train/<class>/ folders")
    out_dir = Path(args.out_dir or f"runs/{SCRIPT}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        out_dir.mkdir(parents=True)  # exclusively: never another run's folder
    except OSError as error:
        fail(f"cannot create the run folder {out_dir}: {error.strerror}")
    print(f"{SCRIPT}: {args.steps} steps per regime on {ctx.device}, to {out_dir}")
    history, summary = [], {}
    for name in args.regimes:
        rows, spectrum = train_regime(name, args, data, ctx)
        history += rows
        summary[name] = dict(family=REGIMES[name]["family"], spectrum=spectrum, **rows[-1])
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
        (out_dir / "summary.json").write_text(json.dumps(dict(args=vars(args), regimes=summary), indent=1))
        plot_regimes(history, summary, out_dir / f"{SCRIPT}.png", 1 / len(data["info"]["classes"]))
    print(f"{'regime':>18} | {'loss':>8} | collapse | erank | kNN top-1")
    for name, row in summary.items():
        print(f"{name:>18} | {row['loss']:8.4f} | {row['collapse']:8.3f} | {row['erank']:5.1f} | "
              f"{row['knn_top1']:.2%}")
    print(f"done: outputs in {out_dir}")
    return summary

def train_regime(name, args, data, ctx):
    """One regime for --steps steps from the common seed: its family shares weights, batches and views."""
    spec = REGIMES[name]
    torch.manual_seed(args.seed)
    regime_class = StudentTeacher if spec["family"] == "vit" else SimSiamRegime
    model = regime_class(spec, args).to(ctx.device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, spec, args)
    if args.compile:
        model.compile()
    steps_per_epoch, history, recent, started = len(data["train_x"]) // args.batch_size, [], [], time.time()
    for step in range(args.steps):
        if step % steps_per_epoch == 0:  # the epoch's order follows from (seed, epoch), for every regime
            generator = torch.Generator().manual_seed(args.seed + step // steps_per_epoch)
            order = torch.randperm(len(data["train_x"]), generator=generator)
        torch.manual_seed(args.seed * 1_000_003 + step)  # and so do the step's views
        for group in optimizer.param_groups if spec["family"] == "vit" else []:  # SimSiam's rate is constant
            group["lr"] = cosine(step, args.steps, optimizer.defaults["lr"], 0.0)
        ema_momentum = cosine(step, args.steps, args.ema_start, 1.0) if spec["teacher"] == "ema" else None
        if spec["teacher"] == "copy" and (step + 1) % steps_per_epoch == 0:  # the student becomes the teacher
            ema_momentum = 0.0
        batch = order[step % steps_per_epoch * args.batch_size:][:args.batch_size].to(ctx.device)
        metrics = train_step(model, optimizer, data["train_x"][batch], spec, ema_momentum, ctx)
        recent.append(metrics)
        evaluate_now = (step + 1) % args.eval_every == 0 or step + 1 == args.steps
        if evaluate_now or (step + 1) % args.log_every == 0:
            means = {key: torch.stack([each[key] for each in recent]).mean().item() for key in metrics}
            row = dict(regime=name, step=step + 1, **means, lr=optimizer.param_groups[0]["lr"],
                       seconds=time.time() - started)
            if not math.isfinite(row["loss"]):
                fail(f"{name}: loss is {row['loss']} at step {step + 1} (the regimes before it are saved)")
            recent = []
            if evaluate_now:
                measures, spectrum = evaluate(model.eval(), data, ctx)
                model.train()
                row.update(measures)
                print(f"{name:>18} step {step + 1}/{args.steps} | " + " | ".join(
                    f"{key} {value:.4g}" for key, value in row.items() if type(value) is float), flush=True)
            history.append(row)
    return history, spectrum

def plot_regimes(history, summary, path, chance):
    """A row per family, a line per regime: loss, collapse, erank, kNN against step; the final spectrum."""
    families = [family for family in ("vit", "siamese") if family in {s["family"] for s in summary.values()}]
    fig = Figure(figsize=(22, 3.9 * len(families)), layout="tight")
    for axes, family in zip(fig.subplots(len(families), 5, squeeze=False), families):
        title = dict(vit="ViT student/teacher", siamese="SimSiam, ResNet-18")[family]
        names = [name for name in summary if summary[name]["family"] == family]
        for number, name in enumerate(names):
            rows, colour, label = [row for row in history if row["regime"] == name], f"C{number}", name
            if REGIMES[name].get("reproduction") and rows[-1]["step"] < REPRODUCTION["separates_after_steps"]:
                label += f" (needs the reproduction's {REPRODUCTION['separates_after_steps']:,}+ steps)"
            for ax, key in zip(axes, ("loss", "collapse", "erank", "knn_top1")):
                steps, values = zip(*[(row["step"], row[key]) for row in rows if key in row])
                ax.plot(steps, values, ".-", color=colour, label=label)
                ax.set(title=f"{title}: {key}", xlabel="step")
            spectrum = summary[name]["spectrum"]
            axes[4].semilogy(range(1, len(spectrum) + 1), spectrum, color=colour)
        axes[1].axhspan(0, 0.1, color="red", alpha=0.08)  # collapsed
        axes[3].axhline(chance, color="grey", linestyle="--")
        # A collapsed embedding has shares of exactly 0 after the first: the axis follows the others instead.
        smallest = min(v for name in names for v in summary[name]["spectrum"] if v > 1e-9)
        axes[4].set(title=f"{title}: final spectrum", xlabel="direction of the l2-normalised test embedding",
                    ylabel="share of the energy", ylim=(smallest / 2, 1))
        axes[0].legend(fontsize=8)
    fig.savefig(path, dpi=100)

def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--dataset", default="cifar10", choices=["cifar10", "cifar100", "stl10", "folder", "synthetic"],
        help="synthetic: coloured noise, for checks")
    add("--data-dir", default="./data", help="download folder; for folder: DIR/{train,test}/<class>/<image>")
    add("--img-size", type=bounded(int, 8), help="resize the images once to this size")
    add("--subset", type=bounded(int, 0), help="train on N random training images, the kNN bank too (0: all)")
    add("--regimes", default=",".join(REGIMES), help="comma-separated, from: " + ", ".join(REGIMES))
    add("--steps", type=bounded(int, 1), help="optimisation steps per regime; the schedules span them")
    add("--batch-size", type=bounded(int, 2), help="images per step")
    add("--eval-every", type=bounded(int, 1), default=25, help="steps between kNN evaluations")
    add("--log-every", type=bounded(int, 1), default=10, help="steps between points of loss and collapse")
    add("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda if there is a GPU")
    add("--compile", action="store_true", help="torch.compile the model and the views' pixel work")
    add("--dtype", choices=["bfloat16", "float32"], help="autocast precision (default: bfloat16 on CUDA)")
    add("--seed", type=int, default=0, help="seed of the weights, the subset and every batch")
    add("--out-dir", help="run folder (default: runs/<script>-<time>)")
    add("--momentum", type=bounded(float, 0, 1, below=True), help="SGD's")
    add("--ema-start", type=bounded(float, 0, 1), help="EMA momentum of the teacher (target) at step 0")
    for name in ("lr", "vit_lr", "weight_decay", "vit_weight_decay", "student_temp", "teacher_temp",
                 "center_momentum"):
        add(f"--{name.replace('_', '-')}", type=bounded(float, 0), help="see RECIPE")
    for name in ("proj_hidden", "proj_dim", "pred_hidden", "patch_size", "dim", "depth", "heads", "mlp_dim",
                 "head_hidden", "head_dim"):
        add(f"--{name.replace('_', '-')}", type=bounded(int, 1), help="see RECIPE")
    parser.set_defaults(**RECIPE)
    return parser

# ===== Shared plumbing, skippable on a first read: the same in every training script (test_shared.py) ====
SCRIPT = Path(__file__).stem
RANK, WORLD_SIZE = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
LARGE_IMAGE_SIZE = 96  # from here on (STL-10, ImageNet-like folders): the ImageNet stem, the papers' blur
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's models take them

def fail(message):
    """Stop with a one-line error; under torchrun every rank stops, rank 0 alone says why."""
    raise SystemExit(f"{SCRIPT}.py: error: {message}" if RANK == 0 else 1)

def bounded(cast, low, high=math.inf, below=False):
    """An argparse type: a finite `cast` in [low, high], or in [low, high) if below."""
    def parse(text):
        value = cast(text)
        if not (math.isfinite(value) and low <= value and (value < high if below else value <= high)):
            raise argparse.ArgumentTypeError(f"must be in [{low}, {high}{')' if below else ']'}, got {text}")
        return value
    parse.__name__ = cast.__name__  # argparse names the type in its own errors
    return parse

def setup(args):
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not cuda:
        fail("--device cuda, but no CUDA GPU is visible")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if WORLD_SIZE > 1:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
        sys.stdout = open(os.devnull, "w") if RANK else sys.stdout  # rank 0 alone prints
    torch.backends.cudnn.benchmark = True
    transform = torch.compile(apply_view, dynamic=False) if args.compile else apply_view
    bfloat16 = (args.dtype or ("bfloat16" if cuda else "float32")) == "bfloat16"
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=bfloat16)
    mean, std = (torch.tensor(values, device=device).view(3, 1, 1) for values in (MEAN, STD))
    return argparse.Namespace(device=device, autocast=autocast, transform=transform, mean=mean, std=std)

def load_data(args, device):
    """The training images (cut to --subset), the labelled ones among them (the kNN monitor's memory
    bank: all but the unlabelled ones, label -1), the test images, and what a resumed run checks."""
    sets = torchvision.datasets
    try:
        if args.dataset == "folder" and not (Path(args.data_dir) / "train").is_dir():
            # no split: every image under DIR trains, unlabelled; up to 2000 spread over them stand in as test
            images = [(p, -1) for p in sorted(Path(args.data_dir).rglob("*"))
                      if p.suffix.lower() in sets.folder.IMG_EXTENSIONS]
            if not images:
                fail(f"no images under {args.data_dir} (for labels: {args.data_dir}/{{train,test}}/<class>/)")
            folders = [argparse.Namespace(classes=[], imgs=images),
                       argparse.Namespace(imgs=images[::math.ceil(len(images) / 2000)])]
        elif args.dataset == "folder":
            folders = [sets.ImageFolder(Path(args.data_dir) / split) for split in ("train", "test")]
            if folders[0].classes != folders[1].classes:
                fail(f"{args.data_dir}/train and {args.data_dir}/test hold different class folders")
        if args.dataset == "folder":
            with ThreadPoolExecutor() as pool:  # PIL lets go of the GIL while it decodes
                splits = [(torch.stack(list(pool.map(decode, f.imgs, [args.img_size] * len(f.imgs)))),
                           torch.tensor([label for _, label in f.imgs], dtype=torch.long)) for f in folders]
        elif args.dataset == "stl10":
            folders = [sets.STL10(args.data_dir, part, download=True) for part in ("train+unlabeled", "test")]
            splits = [(torch.from_numpy(s.data), torch.from_numpy(s.labels).long()) for s in folders]
        elif args.dataset.startswith("cifar"):
            cifar = sets.CIFAR10 if args.dataset == "cifar10" else sets.CIFAR100
            folders = [cifar(args.data_dir, train=train, download=True) for train in (True, False)]
            splits = [(torch.from_numpy(s.data).movedim(3, 1), torch.tensor(s.targets)) for s in folders]
        else:  # synthetic, for checks without a download: 10 classes, each a colour, its images with noise
            seed, labels = torch.Generator().manual_seed(args.seed), torch.arange(2500) % 10
            noise = torch.randn(2500, 3, args.img_size, args.img_size, generator=seed)
            images = (torch.rand(10, 3, 1, 1, generator=seed)[labels] + noise / 4).clamp(0, 1).mul(255).byte()
            folders, splits = [argparse.Namespace(classes=list(range(10)))], [(images[:2000], labels[:2000]),
                                                                               (images[2000:], labels[2000:])]
    except Exception as error:  # no such folder, no images in it, a corrupt image, offline, a broken archive
        fail(f"cannot load {args.data_dir}: {(str(error).strip() or repr(error)).splitlines()[-1]}")
    (train_x, train_y), (test_x, test_y) = splits
    if args.subset:
        keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed))[:args.subset]
        train_x, train_y = train_x[keep], train_y[keep]
    if len(train_x) < args.batch_size or args.batch_size % WORLD_SIZE:
        fail(f"--batch-size {args.batch_size} must split evenly over {WORLD_SIZE} ranks, and not exceed the "
             f"{len(train_x)} training images")
    if train_x.shape[-1] != args.img_size:  # the shorter side to img_size, then a centre crop, 4096 at a time
        train_x, test_x = (torch.cat([TF.center_crop(TF.resize(chunk, args.img_size), args.img_size)
                                      for chunk in images.split(4096)]) for images in (train_x, test_x))
    labelled = train_y >= 0
    data = dict(train_x=train_x, labelled_x=train_x if labelled.all() else train_x[labelled],
                labelled_y=train_y[labelled], test_x=test_x, test_y=test_y)
    info = dict(dataset=args.dataset, classes=list(folders[0].classes), train=len(train_x), test=len(test_x))
    return {**{name: tensor.to(device) for name, tensor in data.items()}, "info": info}

def decode(sample, size):
    image = torchvision.datasets.folder.default_loader(sample[0])
    return TF.pil_to_tensor(TF.center_crop(TF.resize(image, size), size))

def augment(images, view, ctx, size=None, copies=1):
    """`copies` views of every uint8 image, normalised, stacked copy by copy. Each image draws its own
    parameters as torchvision draws them: RandomResizedCrop's box (the first of 10 tries of an area in
    crop_scale and a log-uniform aspect ratio in 3/4..4/3 that fits, else the whole image), the flip,
    ColorJitter's factors and random order, grayscale, solarize and the blur's sigma. Under torchrun every
    rank draws the parameters of the global batch and keeps its share's: the ranks draw as one process."""
    n, side = copies * WORLD_SIZE * len(images), images.shape[-1]
    def uniform(low, high, *shape):
        return torch.empty(n, *shape, device=images.device).uniform_(low, high)
    def chance(probability):  # a mask that broadcasts over (n, 3, H, W)
        return uniform(0, 1, 1, 1, 1) < probability
    area = side * side * uniform(*view["crop_scale"], 10)
    aspect = torch.exp(uniform(math.log(3 / 4), math.log(4 / 3), 10))
    w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (w <= side) & (h <= side)
    first = fits.int().argmax(1, keepdim=True)
    w, h = (torch.where(fits.any(1), length.gather(1, first)[:, 0], side) for length in (w, h))
    left, top = (uniform(0, 1) * (side - w + 1)).floor(), (uniform(0, 1) * (side - h + 1)).floor()
    factors = [uniform(max(0, 1 - view[op]), 1 + view[op]) for op in ("brightness", "contrast", "saturation")]
    p = dict(box=torch.stack([left, top, left + w, top + h], 1), factors=torch.stack(factors, 1),
             order=uniform(0, 1, 4).argsort(1), hue=uniform(-view["hue"], view["hue"]),
             **{key: chance(view[key]) for key in ("flip", "jitter", "grayscale", "solarize")})
    if view["blur"]:  # sigma in pixels of a 224-px image, scaled: the same blur relative to the image
        p.update(blur=chance(view["blur"]), sigma=uniform(*view["blur_sigma"]) * side / 224)
    p = {key: value.unflatten(0, (copies, WORLD_SIZE, -1))[:, RANK].flatten(0, 1) for key, value in p.items()}
    return ctx.transform(images.repeat(copies, 1, 1, 1), p, size or side, ctx.mean, ctx.std)

def apply_view(images, p, size, mean, std):
    """A view's pixel work, given its parameters. The crop is roi_align's: torchvision's resized_crop, but
    for an average where it shrinks and for the edge pixels, which blend in the pixels next to the box."""
    boxes = torch.cat([torch.arange(len(images), device=images.device)[:, None].to(p["box"]), p["box"]], 1)
    x = torchvision.ops.roi_align(images.float().div_(255), boxes, size, sampling_ratio=0, aligned=True)
    x = torch.where(p["flip"], x.flip(-1), x)
    x = torch.where(p["jitter"], color_jitter(x, p["factors"], p["hue"], p["order"]), x)
    x = torch.where(p["grayscale"], TF.rgb_to_grayscale(x).expand_as(x), x)
    if "blur" in p:  # a kernel of 10% of the image (23 taps at 224 px), as SimCLR's and BYOL's
        x = torch.where(p["blur"], gaussian_blur(x, p["sigma"], max(3, 2 * round(0.05 * size - 0.5) + 1)), x)
    x = torch.where(p["solarize"] & (x >= 0.5), 1 - x, x)  # after the blur (BYOL Table 6); at 128 / 255
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

def color_jitter(images, factors, hue, order):
    """ColorJitter in each image's own order. Brightness, contrast and saturation (ops 0-2) blend the image
    with black, its mean grey or its grey image; the costly hue rotation (op 3) runs once, each blend before
    or after it as the image's order says. A hue rotation keeps each pixel's largest and smallest channel:
    RGB = low + (high - low) * ramp(hue), the ramp being the saturated colour of the hue, in sextants."""
    hue_at = (order == 3).int().argmax(1)
    images = images.clone()  # then blended in place: fewer fresh buffers, much faster on a CPU
    for positions, before_hue in ((range(3), True), (range(1, 4), False)):
        for position in positions:
            op = order[:, position, None, None, None]
            due = (position < hue_at) if before_hue else (position > hue_at)
            factor = torch.where(due, factors.gather(1, op.view(-1, 1).clamp(max=2))[:, 0], 1.0)
            gray = TF.rgb_to_grayscale(images)
            reference = torch.addcmul((op == 1) * gray.mean((1, 2, 3), True), gray, op == 2)
            images = images.lerp_(reference, 1 - factor[:, None, None, None]).clamp_(0, 1)
        if before_hue:
            (r, g, b), high, low = images.unbind(1), images.amax(1), images.amin(1)
            spread = high - low
            sextant = torch.where(high == g, b - r + 2 * spread, r - g + 4 * spread)
            sextant = torch.where(high == r, g - b, sextant) / spread.clamp(1e-12) + 6 * hue[:, None, None]
            peaks = torch.arange(0, 6, 2, device=images.device)[:, None, None]
            distance = (sextant[:, None] - peaks + 3) % 6 - 3  # red, green, blue peak at 0, 2, 4, on a circle
            ramp = (2 - distance.abs_()).clamp_(0, 1)
            images = torch.addcmul(low[:, None], spread[:, None], ramp)
    return images

def gaussian_blur(images, sigma, kernel_size):
    """torchvision's gaussian_blur (reflect padding), each image its own sigma: a separable grouped conv2d."""
    taps = torch.arange(kernel_size, device=images.device) - kernel_size // 2
    kernels = torch.softmax(-0.5 * (taps / sigma[:, None]) ** 2, dim=1).repeat_interleave(3, dim=0)  # RGB
    x = F.pad(images, (kernel_size // 2,) * 4, mode="reflect").flatten(0, 1)[None]
    x = F.conv2d(x, kernels.view(-1, 1, 1, kernel_size), groups=len(kernels))  # a kernel per image channel
    return F.conv2d(x, kernels.view(-1, 1, kernel_size, 1), groups=len(kernels)).view_as(images)

def cosine(step, total_steps, start, end, warmup_steps=0):  # a linear warm-up to start, a half cosine to end
    if step < warmup_steps:
        return start * (step + 1) / warmup_steps
    progress = min(1, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return end + (start - end) * (1 + math.cos(math.pi * progress)) / 2

def collapse_metric(z):
    """The std over the batch of the l2-normalised outputs, averaged over dimensions, times sqrt(d): at most
    1 (outputs spread evenly over the sphere), 0 when every image maps to the same point."""
    return F.normalize(z.float(), dim=1).std(dim=0, correction=0).mean() * math.sqrt(z.shape[1])

def effective_rank(z):
    """Roy & Vetterli 2007: exp(entropy) of the normalised singular values of l2-normalised, uncentred z."""
    z = F.normalize(z.double(), dim=1)
    singular = torch.linalg.eigvalsh(z.T @ z if len(z) >= z.shape[1] else z @ z.T).clamp_min(0).sqrt()
    p = singular / singular.sum()
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum()).item()

@torch.no_grad()
def embed(network, images, ctx):
    features = []
    for chunk in images.split(1024):
        with ctx.autocast:
            x = ((chunk.float() / 255 - ctx.mean) / ctx.std).contiguous(memory_format=torch.channels_last)
            features.append(network(x).float())
    return torch.cat(features)

@torch.no_grad()
def knn_top1(bank, bank_labels, features, labels, k=200, temperature=0.1):
    """Weighted kNN top-1 (Wu et al. 2018): the k nearest bank images (cosine) vote exp(similarity / t)."""
    bank, features = F.normalize(bank, dim=1), F.normalize(features, dim=1)
    correct = 0
    for chunk, chunk_labels in zip(features.split(1024), labels.split(1024)):
        similarity, neighbours = (chunk @ bank.T).topk(min(k, len(bank)), dim=1)
        votes = torch.zeros(len(chunk), int(bank_labels.max()) + 1, device=chunk.device)
        votes.scatter_add_(1, bank_labels[neighbours], (similarity / temperature).exp())
        correct += (votes.argmax(dim=1) == chunk_labels).sum().item()
    return correct / len(labels)

if __name__ == "__main__":
    main()
