"""SimSiam: Exploring Simple Siamese Representation Learning (Chen & He, CVPR 2021, arXiv:2011.10566)
on CIFAR-10.

Idea: one network (backbone -> projector) embeds two views of an image, and a predictor maps each
embedding onto the other view's, which is held constant (stop-gradient): no negative pairs, no
momentum encoder. Without the stop-gradient or the predictor the embedding collapses (Sec. 4.1-4.2,
Fig. 2, Table 1); the `collapse`, `collapse_pre_bn`, `off_axis` and `erank` columns of the log show it
(collapse about 1 healthy, 0 collapsed). Behind the projector's affine-free output batch norm the collapse
metric cannot reach 0 on a training batch; in front of it (`collapse_pre_bn`) it can, and so can
`off_axis`, the share of the batch's variance off its main axis (off_axis_share). A frozen random
predictor (Table 1b) narrows the embedding (low off_axis) without collapsing it to a point: its
collapse_pre_bn and its loss stay high (README, SimSiam).

Usage:
    python simsiam.py --epochs 100                                  # CIFAR-10, downloaded to ./data
    python simsiam.py --dataset folder --data-dir DIR               # DIR/train/<class>/*, DIR/test/<class>/*
    python simsiam.py --resume runs/simsiam-<time>/checkpoint.pt    # continue a stopped run
    python simsiam.py --dataset synthetic --subset 512 --batch-size 128 --img-size 16 --epochs 2
        # a quick check without download: half a minute on 2 CPU cores
    python simsiam.py --no-stop-grad --epochs 5                     # Sec. 4.1, Fig. 2: collapses
    python simsiam.py --no-predictor --epochs 5                     # Table 1a: collapses
    python simsiam.py --fixed-predictor --epochs 5                  # Table 1b: narrows, no collapse to a point

Result of the default command: not yet measured (no GPU run so far; the CPU checks are in the README).
"""
import argparse
import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
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
    epochs=100,          # the length of the reproduction's CIFAR-10 tables (KTH report, Table 1)
    batch_size=512,      # SimSiam Appendix D (CIFAR-10)
    # The loss is the paper's, D(p1, z2) / 2 + D(p2, z1) / 2 (Eq. 2, and the official code's scale), so the
    # paper's learning rate is its update.
    lr=0.03,             # per 256 images, scaled by batch/256: Appendix D, base lr 0.03
    momentum=0.9,        # Appendix D
    weight_decay=5e-4,   # Appendix D
    warmup_epochs=0,     # Appendix D: a cosine decay from the start, no warm-up
    proj_hidden=2048,    # Appendix D: a 2-layer projector 2048 -> 2048 for CIFAR (3 layers from 96 px: Sec. 3)
    proj_dim=2048,
    pred_hidden=512,     # Sec. 3: the bottleneck predictor 2048 -> 512 -> 2048
    fix_pred_lr=True,    # Sec. 4.2, Table 1c and the official code: the predictor's lr is not decayed
    knn_k=200,           # the kNN monitor of Wu et al. 2018: 200 neighbours, temperature 0.1
    knn_t=0.1,
)
# Augmentation: SimSiam Appendix D (CIFAR): crop scale 0.2-1, flip, colour jitter (0.4, 0.4, 0.4, 0.1)
# with probability 0.8, grayscale 0.2, no blur, no solarization. Both views are drawn the same way. From
# LARGE_IMAGE_SIZE (96 px: STL-10, ImageNet-size folders) on, the ImageNet recipe's blur too (official
# main_simsiam.py): probability 0.5, sigma 0.1-2 px of a 224-px image scaled to the image size (sample_blur).
VIEW = dict(crop_scale=(0.2, 1.0), flip=0.5, jitter=0.8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
            grayscale=0.2, solarize=0.0, blur=0.0, blur_sigma=(0.1, 2.0))
VIEWS = (VIEW, VIEW)
LARGE_VIEWS = ({**VIEW, "blur": 0.5}, {**VIEW, "blur": 0.5})


# ------------------------------------------------------------------------------------------------
# The method: model, loss, optimiser and the update of one training step
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


def mlp(in_dim, hidden_dim, out_dim, out_bn, hidden_layers=1):
    """SimSiam's projector (out_bn) and predictor (Sec. 3): hidden_layers of Linear -> BatchNorm -> ReLU, then a
    Linear, the projector with batch norm on its output too. The CIFAR projector has one hidden layer
    (Appendix D), the ImageNet one two (Sec. 3, official builder.py). A Linear followed by batch norm needs
    no bias."""
    layers = []
    for layer in range(hidden_layers):
        layers += [nn.Linear(in_dim if layer == 0 else hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                   nn.ReLU(inplace=True)]
    layers.append(nn.Linear(hidden_dim, out_dim, bias=not out_bn))
    return nn.Sequential(*layers, nn.BatchNorm1d(out_dim, affine=False)) if out_bn else nn.Sequential(*layers)


class SimSiam(nn.Module):
    """predictor: "learned", or Table 1's "identity" (a) or "fixed" at initialisation (b); Fig. 2: stop_grad=False."""

    def __init__(self, proj_hidden, proj_dim, pred_hidden, stop_grad=True, predictor="learned", cifar_stem=True):
        super().__init__()
        self.backbone = resnet18_backbone(cifar_stem)
        # From 96 px (without the CIFAR stem), the ImageNet projector: two hidden layers.
        self.projector = mlp(512, proj_hidden, proj_dim, out_bn=True, hidden_layers=1 if cifar_stem else 2)
        self.predictor = (nn.Identity() if predictor == "identity"
                          else mlp(proj_dim, pred_hidden, proj_dim, out_bn=False))
        self.predictor.requires_grad_(predictor == "learned")
        self.stop_grad = stop_grad

    def forward(self, view1, view2):
        """Symmetrised loss (Eq. 2), the projections of view 1, and view 1's projector output before its final
        batch norm (where a collapse to one point can show: collapse_pre_bn in train_step).
        The views are forwarded separately, so batch norm sees one view's statistics at a time."""
        before_bn1 = self.projector[:-1](self.backbone(view1))
        z1, z2 = self.projector[-1](before_bn1), self.projector(self.backbone(view2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        # Stop-gradient (Eqs. 3-4): each view's projection is a constant target for the other's prediction.
        t1, t2 = (z1.detach(), z2.detach()) if self.stop_grad else (z1, z2)
        return negative_cosine(p1, t2) / 2 + negative_cosine(p2, t1) / 2, z1, before_bn1


def negative_cosine(prediction, target):
    """SimSiam Eq. 1: minus the cosine similarity of p and z, batch mean (-1 when aligned)."""
    return -F.cosine_similarity(prediction.float(), target.float(), dim=-1).mean()


def off_axis_share(z, iterations=20):
    """The share of the batch's variance off its main axis: 1 - lambda_max / trace of the centred covariance
    of the l2-normalised outputs. Near 1 - 1/d for outputs spread in every direction, 0 for outputs on one
    line. The collapse metric cannot see that collapse here: behind the projector's affine-free batch norm
    every channel keeps unit variance over the batch, so outputs on one line through the origin still read
    sqrt(1 - m^2) (m their mean sign), while a rank survives batch norm's per-channel affine map and this
    share reads 0 (README, SimSiam). lambda_max by power iteration on the n x n Gram matrix from a fixed
    start, with no host sync: it can only under-estimate lambda_max, so the share never reads collapse
    that is not there."""
    centred = F.normalize(z.float(), dim=1)
    centred = centred - centred.mean(dim=0)
    gram = centred @ centred.T
    vector = torch.linspace(-1, 1, len(z), device=z.device)  # no component along (1, ..., 1), gram's null space
    vector = vector / vector.norm()
    for _ in range(iterations):
        vector = F.normalize(gram @ vector, dim=0)
    top = vector @ gram @ vector
    return 1 - top / gram.trace().clamp_min(1e-12)


def build_model(args):
    predictor = "identity" if args.no_predictor else "fixed" if args.fixed_predictor else "learned"
    return SimSiam(args.proj_hidden, args.proj_dim, args.pred_hidden, not args.no_stop_grad, predictor,
                   args.img_size < LARGE_IMAGE_SIZE)


def make_optimizer(model, args):
    """SGD with momentum in two groups: the encoder follows the schedule; with --fix-pred-lr the predictor
    keeps the base rate (Sec. 4.2, Table 1c). A frozen or absent predictor leaves its group empty."""
    encoder = [*model.backbone.parameters(), *model.projector.parameters()]
    predictor = [param for param in model.predictor.parameters() if param.requires_grad]
    params = [dict(params=encoder, fixed_lr=False), dict(params=predictor, fixed_lr=args.fix_pred_lr)]
    return torch.optim.SGD(params, lr=scaled_lr(args), momentum=args.momentum, weight_decay=args.weight_decay,
                           fused=fused_optimizer(model))


def hyperparameters(step, total_steps, steps_per_epoch, args):
    """The values that change during training, at `step`: the learning rate, a linear warm-up and then a
    half cosine to 0 (Appendix D: no warm-up)."""
    lr = cosine_schedule(step, total_steps, scaled_lr(args), 0.0, int(args.warmup_epochs * steps_per_epoch))
    return dict(lr=lr)


def train_step(model, forward, optimizer, images, hyper, args, data, compute):
    """One step of SimSiam (Algorithm 1): two views, the loss, SGD on the network.
    forward is model's forward, through DistributedDataParallel in a data-parallel run (its backward then
    averages the gradients over the ranks).
    Returns what the log averages over the epoch, as device tensors."""
    for group in optimizer.param_groups:
        if not group["fixed_lr"]:  # with --fix-pred-lr the predictor's group keeps the rate it was made with
            group["lr"] = hyper["lr"]
    views = VIEWS if args.img_size < LARGE_IMAGE_SIZE else LARGE_VIEWS
    view1 = augment(images, views[0], data["mean"], data["std"], compute)
    view2 = augment(images, views[1], data["mean"], data["std"], compute)
    with compute.autocast:
        loss, z1, before_bn1 = forward(view1, view2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    # Two views of collapse behind the output batch norm (README, SimSiam): the paper's std (Fig. 2) of the
    # projector output before that batch norm, which reads 0 when every image maps to one point (behind it the
    # batch norm spreads what is left over unit variance), and the variance off the main axis, 0 when the
    # outputs lie on one line, whichever side of the batch norm.
    return dict(loss=loss.detach(), collapse=collapse_metric(z1.detach()), off_axis=off_axis_share(z1.detach()),
                collapse_pre_bn=collapse_metric(before_bn1.detach()))


# ------------------------------------------------------------------------------------------------
# Training loop: set up or resume, one epoch of steps, evaluate and save
# ------------------------------------------------------------------------------------------------
def main(argv=None):
    args, checkpoint = parse_arguments(argv)
    compute = compute_settings(args.device)
    data = prepare_data(args, compute.device)
    torch.manual_seed(args.seed)
    model = build_model(args).to(compute.device, memory_format=compute.memory_format)
    optimizer = make_optimizer(model, args)
    run = start_run(args, checkpoint, model, optimizer, data, compute)
    with training_frame(run):
        while run.step < run.last_step:
            row, speed, hyper = train_epoch(run)
            evaluate_and_save(run, row, speed, hyper)
    return finish_run(run)


def train_epoch(run):
    """The steps of one epoch from run.step on (a run resumed inside an epoch skips the done ones and
    goes on from the checkpoint's sums of them), with a progress line every --log-every steps and at the
    epoch's end. Returns the epoch's row (the step metrics averaged over the epoch), its speed, and the
    hyperparameters of its last step."""
    args, epoch = run.args, run.step // run.steps_per_epoch
    epoch_start, started, first_step = epoch * run.steps_per_epoch, time.time(), run.step
    sums = run.epoch_sums if run.step > epoch_start else {}
    for images in epoch_batches(epoch, run):
        hyper = hyperparameters(run.step, run.total_steps, run.steps_per_epoch, args)
        metrics = train_step(run.model, run.forward, run.optimizer, images, hyper, args, run.data, run.compute)
        sums = {name: sums.get(name, 0) + value for name, value in metrics.items()}
        run.step += 1
        if run.step % args.log_every == 0 or run.step % run.steps_per_epoch == 0 or run.step == run.last_step:
            # The only host syncs of the loop, at these steps alone (and with several ranks, the only reduction).
            means = {name: total / (run.step - epoch_start) for name, total in mean_over_ranks(sums).items()}
            stop_if_not_finite(means, run.model, run.step, run.checkpoint_path)
            speed = (run.step - run.first_step) * args.batch_size / (time.time() - run.started)
            eta = format_seconds((run.last_step - run.step) * args.batch_size / speed)
            log(progress_line(f"epoch {epoch + 1}/{args.epochs} step {run.step}/{run.last_step}",
                              dict(means, lr=hyper["lr"], images_per_s=speed, eta=eta)))
        if run.step == run.last_step:
            break
    seconds, done, counted = time.time() - started, run.step - first_step, run.step - epoch_start
    run.epoch_sums = mean_over_ranks(sums)
    row = dict(epoch=epoch + 1, step=run.step, **{name: total / counted for name, total in run.epoch_sums.items()})
    speed = dict(images_per_s=done * args.batch_size / seconds, epoch_time_s=seconds)
    if run.compute.device.type == "cuda":
        speed["peak_memory_gb"] = torch.cuda.max_memory_allocated(run.compute.device) / 2**30
    return row, speed, hyper


def evaluate_and_save(run, row, speed, hyper):
    """The end of an epoch (or of --max-steps): every --eval-every epochs the kNN monitor and collapse
    metrics and a progress line; then, at the first epoch of a run, at its last step and otherwise once
    a minute (SAVE_EVERY_S), the checkpoint (atomically), the metrics file and the figure: written by rank 0
    alone, while the other ranks wait for it."""
    rng, args = rng_state(run.compute.device), run.args
    stop_if_not_finite(row, run.model, row["step"], run.checkpoint_path)
    average_running_statistics(run.model)
    if row["epoch"] % args.eval_every == 0 or row["epoch"] == args.epochs or row["step"] == run.last_step:
        row.update(evaluate(run.model, run.data, args, run.compute))
        stop_if_not_finite(row, run.model, row["step"], run.checkpoint_path)
        shown = {name: value for name, value in row.items() if isinstance(value, float)}
        log(progress_line(f"epoch {row['epoch']}/{args.epochs}", {**shown, **speed}))
        run.history.append({**row, **speed, **hyper})

    def save():
        if run.saved_at is not None and row["step"] != run.last_step and time.time() - run.saved_at < SAVE_EVERY_S:
            return
        # Inside an epoch (--max-steps), the sums of its steps so far: the resumed run goes on from them.
        epoch_sums = run.epoch_sums if row["step"] % run.steps_per_epoch != 0 else {}
        # The checkpoint first: the metrics file and the figure never run ahead of it.
        save_checkpoint(run.checkpoint_path, dict(
            script=SCRIPT, format=1, epoch=row["step"] // run.steps_per_epoch, step=row["step"], rng=rng,
            args=vars(args), data=run.data_info, history=run.history, epoch_sums=epoch_sums,
            optimizer=run.optimizer.state_dict(), **checkpoint_entries(run.model, args)))
        run.saved_step = row["step"]
        write_metrics(run.history, run.out_dir)
        if run.history:
            plot_history(run.history, run.out_dir / f"{SCRIPT}.png", figure_panels(args))
        run.saved_at = time.time()

    on_main_rank(save)


def evaluate(model, data, args, compute):
    """kNN top-1 on the backbone features; effective rank and collapse metric of the projected test set."""
    model.eval()
    labelled_features = embed_over_ranks(model.backbone, data["labelled_x"], data["mean"], data["std"], compute)
    test_features = embed_over_ranks(model.backbone, data["test_x"], data["mean"], data["std"], compute)
    with torch.no_grad():
        test_embedding = model.projector(test_features)
    model.train()
    return dict(knn_top1=knn_top1(labelled_features, data["labelled_y"], test_features, data["test_y"],
                                  args.knn_k, args.knn_t),
                erank=effective_rank(test_embedding),
                eval_collapse=collapse_metric(test_embedding).item())


def checkpoint_entries(model, args):
    """The model's part of a checkpoint: its weights, and how linear_eval.py and spectrum.py rebuild its
    backbone and projector from them."""
    arch = dict(backbone="resnet18", backbone_kwargs=dict(cifar_stem=args.img_size < LARGE_IMAGE_SIZE),
                feature_dim=512, backbone_prefix="backbone.",
                projector_prefix="projector.", projector_layers=layer_names(model.projector))
    return dict(arch=arch, model=model.state_dict())


def figure_panels(args):
    """The panels of the run's figure: (history key, title, y-limits or "log", dashed reference line)."""
    return [("loss", "training loss", None, None), ("knn_top1", "kNN top-1 (test)", (0, 1), None),
            ("collapse", "collapse metric (1 healthy, 0 collapsed)", (0, 1.1), None),
            ("collapse_pre_bn", "collapse metric before the output BN (0: one point)", (0, 1.1), None),
            ("off_axis", "variance off the main axis (0: on one line)", (0, 1.1), None),
            ("erank", "effective rank of the embedding", None, None)]


def build_parser():
    """The flags of every training script (below the banner) and the method's own; defaults from RECIPE."""
    parser = shared_parser()
    parser.add_argument("--momentum", type=fraction_below_one, help="SGD momentum")
    parser.add_argument("--proj-hidden", type=positive_int, help="hidden width of the projector")
    parser.add_argument("--proj-dim", type=positive_int, help="output width of the projector and predictor")
    parser.add_argument("--pred-hidden", type=positive_int, help="hidden width of the predictor")
    parser.add_argument("--fix-pred-lr", action=argparse.BooleanOptionalAction, help="no lr decay for the predictor")
    parser.add_argument("--no-stop-grad", action="store_true", help="let the gradient flow into both branches (Fig. 2)")
    predictor = parser.add_mutually_exclusive_group()
    predictor.add_argument("--no-predictor", action="store_true", help="the predictor is the identity (Table 1a)")
    predictor.add_argument("--fixed-predictor", action="store_true", help="a frozen random predictor (Table 1b)")
    parser.set_defaults(**RECIPE)
    return parser


def get_args(argv=None):
    return parse_flags(build_parser(), argv)


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


def shared_parser():
    """The flags of every training script: data, optimisation, evaluation and the run itself."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--dataset", default="cifar10", choices=["cifar10", "cifar100", "stl10", "folder", "synthetic"],
        help="image source")
    add("--data-dir", default="./data", help="download folder (cifar, stl10) or DIR with train/ and test/ (folder)")
    add("--img-size", type=number_type(int, lambda value: value == 0 or value >= 8, "0 or >= 8"), default=0,
        help="images are resized once to this size; 0: the dataset's own (STL-10 96, else 32)")
    add("--stream", action="store_true",
        help="folder: decode the files in DataLoader workers as training goes, not once into memory "
             "(automatic when the decoded images would exceed half the free memory)")
    add("--subset", type=non_negative_int, default=0, help="train on a random N images of the train split (0: all)")
    add("--epochs", type=positive_int, help="length of the schedules")
    add("--max-steps", type=non_negative_int, default=0, help="stop after this many steps in all (0: no limit)")
    add("--batch-size", type=number_type(int, lambda value: value >= 2, ">= 2 (batch statistics need two images)"),
        help="images per step")
    add("--lr", type=positive_float, help="learning rate for batch 256, scaled by batch/256")
    add("--weight-decay", type=non_negative_float, help="weight decay")
    add("--warmup-epochs", type=non_negative_float, help="linear learning-rate warm-up")
    add("--eval-every", type=positive_int, default=1, help="epochs between kNN evaluations")
    add("--log-every", type=positive_int, default=50, help="steps between progress lines")
    add("--knn-k", type=positive_int, help="neighbours that vote in the kNN monitor")
    add("--knn-t", type=positive_float, help="temperature of the kNN vote weights")
    add("--device", default="auto", help="auto, cuda, mps or cpu")
    add("--compile", action="store_true", help="torch.compile the model's forward pass and the views' pixel work")
    add("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
        help="data-parallel on CUDA: batch norm over the global batch (nn.SyncBatchNorm); per rank elsewhere")
    add("--seed", type=int, default=0, help="seed of the weights, the subset and every batch")
    add("--out-dir", default=None, help="run folder; None: a new one, runs/<script>-<time>")
    add("--resume", default=None, help="checkpoint.pt of a run to continue")
    return parser


# The size --img-size 0 takes: the dataset's own (a folder's images and the synthetic ones: CIFAR's).
NATIVE_IMAGE_SIZE = dict(stl10=96)


def parse_flags(parser, argv):
    """The parsed flags, with --img-size 0 made the dataset's own size."""
    args = parser.parse_args(argv)
    args.img_size = args.img_size or NATIVE_IMAGE_SIZE.get(args.dataset, 32)
    return args


# A fast epoch (seconds on a GPU) would spend a large share of its time writing a 190 MB checkpoint
# and drawing the figure: they are written once a minute, at the first epoch and at the last step.
SAVE_EVERY_S = 60

# A resumed run keeps its settings, except these flags of the invocation itself, and --epochs,
# --eval-every, --log-every and --data-dir when given again.
RUN_FLAGS = ("max_steps", "device", "compile", "sync_bn", "stream", "out_dir", "resume")
RESUME_FLAGS = ("epochs", "eval_every", "log_every", "data_dir")


def parse_arguments(argv):
    """The run's settings and, with --resume, the checkpoint it continues: the one place where a
    resumed run is told from a new one."""
    args = get_args(argv)
    if not args.resume:
        return args, None
    checkpoint = load_checkpoint(args.resume)
    return resume_args(args, checkpoint["args"], given_flags(argv)), checkpoint


def given_flags(argv):
    """The names of the flags given on the command line, whatever their values: parsed once more with
    a default that no flag can take."""
    parser, not_given = build_parser(), object()
    parser.set_defaults(**dict.fromkeys(vars(parser.parse_args([])), not_given))
    return {name for name, value in vars(parser.parse_args(argv)).items() if value is not not_given}


def resume_args(args, saved, given):
    """The settings of a resumed run: those it was started with (`saved`), and the flags above."""
    for name in sorted(given - set(RUN_FLAGS) - set(RESUME_FLAGS)):
        if getattr(args, name) != saved.get(name):
            fail(f"--{name.replace('_', '-')} {getattr(args, name)} differs from the checkpoint's {saved.get(name)}; a "
                 f"resumed run keeps its settings (only --epochs, --eval-every, --log-every and --data-dir may change)")
    resumed = {**vars(args), **saved, **{name: getattr(args, name) for name in RUN_FLAGS}}
    resumed.update({name: getattr(args, name) for name in given & set(RESUME_FLAGS)})
    resumed["out_dir"] = args.out_dir or str(Path(args.resume).parent)
    return argparse.Namespace(**resumed)


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


def data_parallel(model, args, compute):
    """The forward of the training step. With several ranks: the model's batch norm synchronised over them
    on CUDA (--sync-bn; SyncBatchNorm needs CUDA, so on the CPU each rank normalises its own share), and its
    forward through DistributedDataParallel, whose backward averages the gradients over the ranks, so that
    every rank takes the same optimiser step and the weights stay equal without being sent. The EMA
    target, outside the optimiser, then stays equal by itself. In one process: the model itself."""
    if compute.world_size == 1:
        return model
    has_bn = any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in model.modules())
    if has_bn and args.sync_bn and compute.device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the layers in place, keeping their tensors
        log(f"batch norm synchronised over {compute.world_size} ranks (--no-sync-bn: per rank)")
    elif has_bn:
        log(f"batch norm per rank, over {args.batch_size // compute.world_size} images"
            + (" (SyncBatchNorm needs CUDA)" if args.sync_bn else ""))
    # The running statistics are averaged at each epoch's end instead (average_running_statistics).
    return DistributedDataParallel(model, device_ids=[compute.device] if compute.device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def own_share(rows, compute, copies=1):
    """This rank's share of rows laid out as `copies` stacked copies of the global batch: of each copy, the
    rank's contiguous block of batch / world_size rows (in one process, all rows)."""
    return rows.unflatten(0, (copies, compute.world_size, -1))[:, compute.rank].flatten(0, 1)


def mean_over_ranks(values):
    """Named device scalars (the epoch's sums of the step metrics) averaged over the ranks, as floats: one
    all-reduce of one stacked tensor and one host sync, however many names."""
    if not values:
        return {}
    stacked = torch.stack([value.double() for value in values.values()])
    return dict(zip(values, average_over_ranks(stacked).tolist()))


def average_over_ranks(tensor):
    """The tensor averaged over the ranks, in place (an all-reduce; in one process, the tensor itself)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


@torch.no_grad()
def average_running_statistics(model):
    """Batch norm's running statistics averaged over the ranks before they are evaluated or saved: with
    per-rank batch norm each rank has its own. (Synchronised, they are equal already; they take no part in
    training, which normalises with the batch's statistics.)"""
    if dist.is_initialized():
        for name, buffer in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                average_over_ranks(buffer)


def on_main_rank(action):
    """action() on rank 0 alone (what writes the run's files), its result sent to every rank, which also
    waits for it; if it fails, every rank stops, so none waits for a rank that is gone."""
    if not dist.is_initialized():
        return action()
    outcome = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [(True, action())]
        except SystemExit as stop:
            outcome = [(False, stop.code)]
    dist.broadcast_object_list(outcome, src=0)
    succeeded, value = outcome[0]
    if not succeeded:
        raise SystemExit(value if dist.get_rank() == 0 else 1)
    return value


def fused_optimizer(model):
    """One fused kernel per optimiser step where the device has it (CUDA and CPU)."""
    return next(model.parameters()).device.type in ("cuda", "cpu")


def scaled_lr(args):
    """--lr is the learning rate for batch 256; the run's batch scales it linearly."""
    return args.lr * args.batch_size / 256


def start_run(args, checkpoint, model, optimizer, data, compute):
    """The run's state: a new one, or the one the checkpoint saved (weights, optimiser, step, history).
    An epoch stopped inside is redone from the checkpoint's step, so its history row is dropped."""
    if args.batch_size % compute.world_size:
        fail(f"--batch-size {args.batch_size} (the global batch) does not split evenly over {compute.world_size} ranks")
    steps_per_epoch = len(data["train_x"]) // args.batch_size  # the last partial batch is dropped
    total_steps = args.epochs * steps_per_epoch
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
    data_info = dict(dataset=args.dataset, img_size=args.img_size, num_classes=len(data["classes"]),
                     classes=list(data["classes"]), num_train=len(data["train_x"]), num_test=len(data["test_x"]),
                     fingerprint=data["fingerprint"], mean=data["mean"].flatten().tolist(),
                     std=data["std"].flatten().tolist())
    step, history, epoch_sums = 0, [], {}
    if checkpoint:
        check_same_data(checkpoint["data"], data_info, args)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, history, epoch_sums = checkpoint["step"], checkpoint["history"], checkpoint.get("epoch_sums", {})
    if args.compile:
        model.compile(dynamic=False)  # compiles model(...) in place: the state dict keeps its keys
    forward = data_parallel(model, args, compute)
    out_dir, folder_lock, created_folder = on_main_rank(lambda: claim_run_folder(args.out_dir, args.resume))
    if not is_main_rank():  # the folder is rank 0's to hold
        folder_lock, created_folder = None, False
    if checkpoint:
        log(f"resumed {args.resume} at step {step}")
    ranks = f" x {compute.world_size} ranks" if compute.world_size > 1 else ""
    log(f"{SCRIPT}: {len(data['train_x'])} train / {len(data['test_x'])} test images on {compute.device}{ranks}, "
        f"{steps_per_epoch} steps per epoch, writing to {out_dir}")
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)
    if warmup_steps >= last_step > step:
        log(f"warning: the {args.warmup_epochs:g}-epoch warm-up ({warmup_steps} steps) is as long as the run "
            f"({last_step} steps): the learning rate never reaches its peak")
    return SimpleNamespace(
        args=args, model=model, forward=forward, optimizer=optimizer, data=data, compute=compute, data_info=data_info,
        steps_per_epoch=steps_per_epoch, total_steps=total_steps, last_step=last_step, step=step,
        history=[row for row in history if row["epoch"] <= step // steps_per_epoch], epoch_sums=epoch_sums,
        rng=checkpoint["rng"] if checkpoint else None, started=time.time(), first_step=step, saved_at=None,
        saved_step=step if checkpoint else None, out_dir=out_dir, folder_lock=folder_lock,
        created_folder=created_folder, checkpoint_path=out_dir / "checkpoint.pt")


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


@contextlib.contextmanager
def training_frame(run):
    """Around the training loop: Ctrl-C stops the run with how to go on (exit code 130), the run folder's
    lock is released however the loop ends, and a folder this run created is removed if the run stopped
    before writing anything into it."""
    try:
        yield
    except KeyboardInterrupt:
        saved = (f"{run.checkpoint_path} holds step {run.saved_step}: continue with --resume {run.checkpoint_path}"
                 if run.saved_step is not None else "no checkpoint was written yet")
        if is_main_rank():
            print(f"\n{SCRIPT}.py: interrupted at step {run.step}; {saved}", file=sys.stderr)
        raise SystemExit(130)
    finally:
        if run.folder_lock is not None:
            os.close(run.folder_lock)
        if run.created_folder and not any(run.out_dir.iterdir()):
            run.out_dir.rmdir()


def check_same_data(saved, current, args):
    """A resumed run must train on the data it started on: the same classes, image counts and pixels
    (the fingerprint of the decoded splits), whatever --data-dir now points at."""
    names = ["dataset", "img_size", "classes", "num_train", "num_test"]
    # A fingerprint of pixels and one of streamed files do not compare (a run may resume on the other path).
    if saved.get("fingerprint", "").startswith("files:") == current["fingerprint"].startswith("files:"):
        names.append("fingerprint")
    differing = [name for name in names if name in saved and saved[name] != current[name]]
    if differing:
        fail(f"--data-dir {args.data_dir} holds other data than the checkpoint was trained on (differing: "
             f"{', '.join(differing)}); resume with the run's own data, or start a new run")


def finish_run(run):
    if run.history:
        last = run.history[-1]
        log(f"done: epoch {last['epoch']} kNN top-1 {last['knn_top1']:.2%} (last epoch), "
            f"collapse {last['collapse']:.3f}, outputs in {run.out_dir}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return run.history


def epoch_batches(epoch, run):
    """The uint8 images of the epoch's batches (of each, this rank's share) on the device, from run.step on:
    indexed from the decoded split, or decoded from the files by DataLoader workers (streamed). All
    randomness of an epoch follows from (seed, epoch), and a run resumed inside it restores the generators'
    state of its stop: it draws what the uninterrupted run would have drawn."""
    torch.manual_seed(run.args.seed * 100_003 + epoch)
    train_x, device = run.data["train_x"], run.compute.device
    permutation = torch.randperm(len(train_x), device=device)
    batches = permutation[:run.steps_per_epoch * run.args.batch_size].view(run.steps_per_epoch, -1)
    done = run.step - epoch * run.steps_per_epoch
    if done:
        set_rng_state(run.rng, device)
    shares = [own_share(batch, run.compute) for batch in batches[done:]]
    if isinstance(train_x, ImageFiles):  # one host copy of the epoch's indices, for the workers
        return (images.to(device, non_blocking=True) for images in train_x.batches(torch.stack(shares).tolist()))
    return (train_x[share] for share in shares)


def progress_line(head, values):
    """The one format of every progress line: `head | name value | ...`."""
    formats = dict(loss="loss {:.4f}", knn_top1="knn {:.2%}", erank="erank {:.1f}", lr="lr {:.3g}",
                   images_per_s="{:.0f} img/s", epoch_time_s="{:.1f} s/epoch", eta="eta {}")
    return " | ".join([head] + [formats.get(name, name + " {:.3f}").format(value) for name, value in values.items()])


def format_seconds(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def stop_if_not_finite(values, model, step, checkpoint_path):
    """A NaN/inf among the logged values (loss, evaluation metrics) or in the weights and batch-norm
    statistics ends the run before anything more is evaluated or saved, so the checkpoint on disk stays
    good. Weights: x * 0 is 0 for a finite x and NaN otherwise, so one norm per tensor, all in two fused
    calls, tells (one host sync; at progress lines and epochs only). The logged values are the ranks' means
    already, so every rank takes the same decision."""
    problems = [f"{name} is {value}" for name, value in values.items()
                if isinstance(value, float) and not math.isfinite(value)]
    tensors = [tensor for tensor in model.state_dict().values() if tensor.is_floating_point()]
    # Summed over the ranks, so that all of them stop together, whichever rank's tensors overflowed.
    if average_over_ranks(torch.stack(torch._foreach_norm(torch._foreach_mul(tensors, 0.0))).sum()).item() != 0:
        problems.append("the weights hold NaN or inf")
    if problems:
        kept = f"{checkpoint_path} is the last good one" if checkpoint_path.exists() else "no checkpoint was written"
        fail(f"{' and '.join(problems)} at step {step}; stopped without saving ({kept}); try a lower --lr")


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


# From this size on images are ImageNet-like (STL-10's 96 px, ImageNet-size folders): the ResNets take
# torchvision's ImageNet stem rather than CIFAR's, and the views add the papers' blur.
LARGE_IMAGE_SIZE = 96
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


def embed_over_ranks(network, images, mean, std, compute):
    """embed() in a data-parallel run: each rank embeds a contiguous share of the images and the shares are
    gathered, so every rank gets every feature, and computes the same kNN accuracy."""
    if compute.world_size == 1:
        return embed(network, images, mean, std, compute)
    share = -(-len(images) // compute.world_size)
    features = embed(network, images[compute.rank * share:(compute.rank + 1) * share], mean, std, compute)
    shares = [features.new_empty(share, features.shape[1]) for _ in range(compute.world_size)]
    dist.all_gather(shares, F.pad(features, (0, 0, 0, share - len(features))))  # the last share may be short
    return torch.cat(shares)[:len(images)]


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
def layer_names(sequential):
    """The layout of an MLP as the checkpoint's `arch` records it, read off the module itself."""
    names = {nn.Linear: "linear", nn.BatchNorm1d: "bn", nn.SyncBatchNorm: "bn", nn.ReLU: "relu", nn.GELU: "gelu"}
    return [names[type(layer)] for layer in sequential]


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


def save_checkpoint(path, state):
    write_atomically(path, lambda tmp: torch.save(state, tmp))


# What every checkpoint holds; linear_eval.py and spectrum.py read "arch", "model" and "data".
CHECKPOINT_KEYS = ("script", "step", "rng", "args", "data", "history", "optimizer", "arch", "model")


def load_checkpoint(path):
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        fail(f"no checkpoint at {path}")
    except IsADirectoryError:
        fail(f"--resume {path} is a folder; give its checkpoint.pt")
    except Exception:
        with open(path, "rb") as file:
            zipped = file.read(4) == b"PK\x03\x04"  # torch.save writes a zip archive
        fail(f"cannot read checkpoint {path}: " + ("it is truncated or damaged (an incomplete archive)" if zipped
                                                   else "it is not a PyTorch checkpoint"))
    if not isinstance(checkpoint, dict) or checkpoint.get("script") != SCRIPT:
        writer = checkpoint.get("script") if isinstance(checkpoint, dict) else None
        fail(f"{path} was written by {writer + '.py' if writer else 'another program'}, not {SCRIPT}.py")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        fail(f"{path} lacks {', '.join(missing)}: not a complete {SCRIPT}.py checkpoint")
    return checkpoint


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


def write_metrics(history, out_dir):
    write_atomically(out_dir / "metrics.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(row) + "\n"
                                                                                  for row in history)))


def plot_history(history, path, panels):
    """One panel per (history key, title, y-limits or "log", dashed reference line) against epoch; a key
    whose values are lists (a spectrum) gets one line per entry, dark for the first."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    rows = (len(panels) + 3) // 4
    fig, axes = plt.subplots(rows, 4, figsize=(16, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (key, title, ylim, reference) in zip(axes.flat, panels):
        values = [row.get(key, math.nan) for row in history]  # a row from before a key was logged: a gap
        if isinstance(values[0], list):
            ax.set_prop_cycle(color=plt.cm.viridis([j / len(values[0]) for j in range(len(values[0]))]))
        ax.plot(epochs, values, marker="o", markersize=3)
        if reference is not None:
            ax.axhline(reference, color="grey", linestyle="--")
        if ylim == "log":
            ax.set_yscale("log", nonpositive="mask")
        elif ylim:
            ax.set_ylim(*ylim)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{SCRIPT}: {path.parent.name}")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
