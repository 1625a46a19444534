"""DirectPred: a linear predictor set from the statistics of its input instead of being trained
(Tian, Chen & Ganguli, "Understanding Self-Supervised Learning Dynamics without Contrastive Pairs",
ICML 2021, arXiv:2102.06810).

Idea: BYOL with one linear predictor W_p that gets no gradient: it is set from a running average F-hat of
the correlation E[z z^T] of the online projections, with its eigenvectors and eigenvalues sqrt(s_j / max s)
+ eps (Eqs. 18-19): the eigenspace alignment a trained predictor only drifts towards. `--predictor sgd` trains
the same map (the baseline). Logged: F-hat's and W_p's eigenvalues, their alignment and W_p's asymmetry.

Usage:
    python directpred.py --epochs 100                                  # CIFAR-10, downloaded to ./data
    python directpred.py --predictor sgd --symmetric                   # trained linear predictor, W sym.
    python directpred.py --ema 0                                       # no EMA: the target is the online net
    python directpred.py --dataset folder --data-dir DIR               # DIR/{train,test}/<class>/*
    python directpred.py --resume runs/directpred-<time>/checkpoint.pt # continue a stopped run
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
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms.v2 import functional as TF

# ===== Hyperparameters: each entry is the default of the flag of the same name, with its source ===
RECIPE = dict(
    epochs=100,          # the length of the reproduction's CIFAR-10 tables (KTH report, Table 1)
    batch_size=128,      # Tian et al.'s CIFAR-10 code (facebookresearch/luckmatters, ssl/real-dataset)
    # luckmatters' loss is -2 cos per view pair, summed over the two views, batch mean (byol_trainer.py):
    # ours, (2 - 2 cos) summed the same way, differs by a constant, so the same lr is the same update.
    lr=0.06,             # per 256 images: luckmatters' 0.03 at batch 128, held constant
    momentum=0.9,        # luckmatters
    weight_decay=4e-4,   # luckmatters
    warmup_epochs=0,     # luckmatters: a constant learning rate
    proj_hidden=512,     # Tian et al., CIFAR-10: projector 512 -> 128
    proj_dim=128,
    ema=0.996,           # luckmatters: a fixed EMA momentum
    predictor="direct",  # Eq. 18: W_p set from F-hat ("sgd": the trained baseline)
    pred_freq=1,         # W_p set at every step
    rho=0.3,             # Eq. 19: F-hat's averaging; luckmatters' README command (dyn_lambda=0.3)
    eps=0.01,            # luckmatters' README command (dyn_eps=0.01; the KTH reproduction used 0.1)
)
# Augmentation: luckmatters' CIFAR-10 transforms (no blur: "cifar10 images are small"), both views alike; from
# 96 px on, its STL-10 blur of every image: sigma 0.1-2 px of a 224-px image, scaled (not 0.1-2 px at 96 px).
VIEW = dict(crop_scale=(0.08, 1.0), flip=0.5, jitter=0.8, brightness=0.4, contrast=0.4, saturation=0.4,
            hue=0.1, grayscale=0.2, solarize=0.0, blur=0.0, blur_sigma=(0.1, 2.0))
VIEWS = (VIEW, VIEW)
LARGE_VIEWS = ({**VIEW, "blur": 1.0}, {**VIEW, "blur": 1.0})

# ===== The method: model, loss, optimiser, schedules and one training step ========================
def resnet18(img_size):
    net = torchvision.models.resnet18()
    if img_size < LARGE_IMAGE_SIZE:  # the CIFAR stem: a 3x3 stride-1 conv, no max-pool
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()  # no classifier: 512-d features
    return net

def direct_predictor(F_hat, eps, squarings=16, iterations=30):
    """Tian et al. Eq. 18: W_p = U diag(sqrt(s_j / s_max) + eps) U^T for F-hat = U diag(s) U^T, i.e.
    (F-hat / s_max)^(1/2) + eps I, by matrix products alone (eigh and a spectral norm wait for the GPU)."""
    # s_max: P = F-hat^65536, kept at trace 1, projects onto the top eigenvector, and tr(P F-hat) / tr(P) is
    # its eigenvalue (at worst 6e-5 below it, when many crowd the top; up to 512 dimensions)
    power, identity = F_hat, torch.eye(len(F_hat), dtype=F_hat.dtype, device=F_hat.device)
    for _ in range(squarings):
        power = power / power.trace().clamp_min(1e-300)
        power = power @ power
    Y, Z = F_hat * power.trace() / (power @ F_hat).trace().clamp_min(1e-300), identity
    # The square root by coupled Newton-Schulz (Higham 2008, Sec. 6.7): eigenvalues above 1e-9 settle in 30.
    for _ in range(iterations):
        T = (3 * identity - Z @ Y) / 2
        Y, Z = Y @ T, T @ Z
    return (Y + Y.T) / 2 + eps * identity

class BYOL(nn.Module):
    def __init__(self, img_size, proj_hidden, proj_dim, predictor, symmetric):
        super().__init__()
        self.backbone = resnet18(img_size)
        # BYOL's projector (Sec. 3.3), its batch norm without affine parameters as luckmatters'
        self.projector = nn.Sequential(nn.Linear(512, proj_hidden), nn.BatchNorm1d(proj_hidden, affine=False),
                                       nn.ReLU(inplace=True), nn.Linear(proj_hidden, proj_dim))
        self.predictor = nn.Linear(proj_dim, proj_dim, bias=False).requires_grad_(predictor == "sgd")
        self.symmetric = symmetric
        # F-hat, the running E[z z^T], saved with the weights like batch norm's running statistics; float64
        self.register_buffer("F_hat", torch.zeros(proj_dim, proj_dim, dtype=torch.float64))
        # The target starts as a copy of the online network; only the EMA moves it (BYOL Sec. 3.1, Eq. 1).
        self.target = copy.deepcopy(nn.Sequential(self.backbone, self.projector)).requires_grad_(False)

    def predictor_matrix(self):
        """W_p as applied: with --symmetric, the symmetric part of the weight (Tian et al.'s analysis)."""
        weight = self.predictor.weight
        return (weight + weight.T) / 2 if self.symmetric else weight

    def forward(self, view1, view2):
        """BYOL Eq. 2 and its mirror, and both views' projections; a pass per view, so BN sees one view."""
        z1, z2 = self.projector(self.backbone(view1)), self.projector(self.backbone(view2))
        p1, p2 = F.linear(z1, self.predictor_matrix()), F.linear(z2, self.predictor_matrix())
        with torch.no_grad():  # the target runs in train mode too: its batch norm uses batch statistics
            t1, t2 = self.target(view1), self.target(view2)
        return regression_loss(p1, t2) + regression_loss(p2, t1), z1, z2

    @torch.no_grad()
    def update_predictor(self, z1, z2, rho, set_predictor, eps):
        """Eq. 19: F-hat <- rho F-hat + (1 - rho) E[z z^T] over both views (under torchrun over the global
        batch, so that F-hat, and W_p, are the same on every rank); then, if due, W_p set from F-hat."""
        z = torch.cat([z1, z2]).double()
        correlation = z.T @ z / (len(z) * WORLD_SIZE)  # summed over the ranks below
        if WORLD_SIZE > 1:
            dist.all_reduce(correlation)
        self.F_hat.lerp_(correlation, 1 - rho)
        if set_predictor:
            self.predictor.weight.copy_(direct_predictor(self.F_hat, eps))

    @torch.no_grad()
    def update_target(self, momentum):
        """target <- momentum * target + (1 - momentum) * online, every tensor in one fused call."""
        online = [*self.backbone.parameters(), *self.projector.parameters()]
        torch._foreach_lerp_(list(self.target.parameters()), online, 1 - momentum)

def regression_loss(prediction, target):
    """BYOL Eq. 2: the squared distance of the l2-normalised vectors, 2 - 2 cos(p, z), batch mean."""
    return 2 - 2 * F.cosine_similarity(prediction.float(), target.float(), dim=-1).mean()

def build_model(args):  # --symmetric changes nothing with --predictor direct: its W_p is symmetric
    return BYOL(args.img_size, args.proj_hidden, args.proj_dim, args.predictor, args.symmetric)

def networks(model):
    return model.backbone, model.projector

def make_optimizer(model, args):
    """SGD with momentum on the online network (the target takes no gradient, nor a direct W_p)."""
    params = [param for param in model.parameters() if param.requires_grad]
    return torch.optim.SGD(params, lr=args.lr * args.batch_size / 256, momentum=args.momentum,
                           weight_decay=args.weight_decay, fused=True)

def schedules(step, steps_per_epoch, args):
    """lr (constant after any warm-up), rho (0 at step 0: F-hat starts at the first batch), set_predictor."""
    warmup, lr = int(args.warmup_epochs * steps_per_epoch), args.lr * args.batch_size / 256
    return dict(lr=cosine(step, 1, lr, lr, warmup), rho=0.0 if step == 0 else args.rho,
                set_predictor=args.predictor == "direct" and step % args.pred_freq == 0)

def train_step(model, forward, optimizer, images, hyper, args, ctx):
    """One step (Sec. 5): views, loss, SGD, the target's EMA, F-hat's average and, if due, W_p from it."""
    for group in optimizer.param_groups:
        group["lr"] = hyper["lr"]
    views = VIEWS if args.img_size < LARGE_IMAGE_SIZE else LARGE_VIEWS
    view1, view2 = (augment(images, view, ctx) for view in views)
    with ctx.autocast:
        loss, z1, z2 = forward(view1, view2)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.update_target(args.ema)
    model.update_predictor(z1.detach(), z2.detach(), hyper["rho"], hyper["set_predictor"], args.eps)
    return dict(loss=loss.detach(), collapse=collapse_metric(z1.detach()))

@torch.no_grad()
def predictor_statistics(F_hat, predictor):
    """Tian et al.'s alignment test: F-hat's eigenvalues s_j (descending); u_j^T W_p u_j / |W_p u_j| for its
    eigenvectors u_j (1: aligned) and its mean; W_p's eigenvalues (real parts), |W - W^T|_F / |W + W^T|_F."""
    s, U = torch.linalg.eigh(F_hat)
    s, U, W = s.flip(0), U.flip(1), predictor.double()
    alignment = (U * (W @ U)).sum(dim=0) / (W @ U).norm(dim=0).clamp(min=1e-12)
    predictor_eigenvalues = torch.linalg.eigvals(W).real.sort(descending=True).values
    return dict(F_eigenvalues=s.tolist(), predictor_eigenvalues=predictor_eigenvalues.tolist(),
                alignment=alignment.tolist(), mean_alignment=alignment.mean().item(),
                asymmetry=((W - W.T).norm() / (W + W.T).norm().clamp(min=1e-12)).item())

def evaluate(model, data, ctx):
    statistics = predictor_statistics(model.F_hat, model.predictor_matrix())
    return dict(monitor(*networks(model), data, ctx), **statistics)

def build_parser():
    parser = shared_parser()
    add = parser.add_argument
    add("--momentum", type=bounded(float, 0, 1, below=True), help="SGD momentum")
    add("--proj-hidden", type=bounded(int, 1), help="hidden width of the projector")
    add("--proj-dim", type=bounded(int, 1), help="output width of projector and predictor")
    add("--ema", type=bounded(float, 0, 1), help="target EMA momentum; 0: the target is the online network")
    add("--predictor", choices=["direct", "sgd"], help="W_p set from F-hat, or trained by SGD")
    add("--pred-freq", type=bounded(int, 1), help="steps between settings of W_p (direct)")
    add("--symmetric", action="store_true", help="sgd: use (W + W^T) / 2 as the predictor")
    add("--rho", type=bounded(float, 0, 1, below=True), help="F-hat <- rho F-hat + (1 - rho) E[z z^T]")
    add("--eps", type=bounded(float, 0), help="added to every eigenvalue of W_p")
    parser.set_defaults(**RECIPE)
    return parser

# ===== The training loop ==========================================================================
def main(argv=None):
    args, checkpoint = parse_args(argv)
    ctx = setup(args)
    data = load_data(args, ctx.device)
    torch.manual_seed(args.seed)
    model = build_model(args).to(ctx.device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, args)
    step, history = (checkpoint["step"], checkpoint["history"]) if checkpoint else (0, [])
    if checkpoint:  # the weights, the optimiser and the step: every random draw follows from (seed, step)
        try:  # strictly: a checkpoint of an older version of the script does not fit
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
        except (RuntimeError, ValueError) as error:
            fail(f"the weights of {args.resume} do not fit {SCRIPT}.py: {' '.join(str(error).split())[:150]}")
        if checkpoint["data"] != data["info"]:
            fail(f"--data-dir {args.data_dir} holds other images than the ones the run started on")
    if args.compile:
        model.compile()
    # Under torchrun DDP averages the gradients over the ranks. Batch norm normalises each rank's share
    # (nn.SyncBatchNorm would wait for the host in every layer); the running statistics are rank 0's.
    forward = DistributedDataParallel(model) if WORLD_SIZE > 1 else model
    out_dir = ctx.out_dir = Path(args.out_dir or f"runs/{SCRIPT}-{time.strftime('%Y%m%d-%H%M%S')}")
    if RANK == 0 and not checkpoint:  # a new folder, never another run's, and step 0 to resume from
        try:
            out_dir.mkdir(parents=True)
        except OSError as error:
            fail(f"cannot create the run folder {out_dir}: {error.strerror} (continue its run with --resume)")
        save_run(out_dir, model, optimizer, args, data, step, history)
    steps_per_epoch = len(data["train_x"]) // args.batch_size
    last_step = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    knn = "" if len(data["labelled_y"]) else ", no labels: no kNN monitor"
    print(f"{SCRIPT}: {steps_per_epoch} steps per epoch on {WORLD_SIZE} x {ctx.device}{knn}, to {out_dir}")
    sums, first_step, started = {}, step, time.time()
    while step < last_step:
        epoch = step // steps_per_epoch
        if step == first_step or step % steps_per_epoch == 0:  # the epoch's order follows from (seed, epoch)
            generator = torch.Generator().manual_seed(args.seed + epoch)
            order = torch.randperm(len(data["train_x"]), generator=generator).to(ctx.device)
        torch.manual_seed(args.seed * 1_000_003 + step)  # and the step's views from (seed, step)
        batch = order[step % steps_per_epoch * args.batch_size:][:args.batch_size].view(WORLD_SIZE, -1)[RANK]
        hyper = schedules(step, steps_per_epoch, args)
        metrics = train_step(model, forward, optimizer, data["train_x"][batch], hyper, args, ctx)
        sums = {name: sums.get(name, 0) + value for name, value in metrics.items()}
        step += 1
        epoch_end = step % steps_per_epoch == 0 or step == last_step
        if step % args.log_every and not epoch_end:
            continue
        means = torch.stack(list(sums.values())).double() / (step - max(first_step, epoch * steps_per_epoch))
        if WORLD_SIZE > 1:  # the loop's only reduction
            dist.all_reduce(means.div_(WORLD_SIZE))
        row = dict(epoch=epoch + 1, step=step, **dict(zip(sums, means.tolist())), **hyper)  # one host sync
        if not math.isfinite(row["loss"]):
            fail(f"loss is {row['loss']} at step {step}; resume from the last good checkpoint.pt in "
                 f"{out_dir} with --dtype float32, or start again with a lower --lr")
        row["images_per_s"] = (step - first_step) * args.batch_size / (time.time() - started)
        evaluated = epoch_end and RANK == 0 and ((epoch + 1) % args.eval_every == 0 or step == last_step)
        if evaluated:
            row.update(evaluate(model.eval(), data, ctx))
            model.train()
        shown = [f"{key} {value:.4g}" for key, value in row.items() if type(value) is float]
        eta = f"eta {(last_step - step) * args.batch_size / row['images_per_s'] / 60:.1f} min"
        print(f"epoch {epoch + 1}/{args.epochs} step {step}/{last_step}", *shown, eta, sep=" | ", flush=True)
        if epoch_end:  # a row an epoch; an epoch resumed midway gets one, the means of its steps since then
            history = [old for old in history if old["epoch"] <= epoch] + [row]
            sums = {}
        if evaluated:  # every --eval-every epochs, and at the end
            save_run(out_dir, model, optimizer, args, data, step, history)
    print(f"done: {step} steps; checkpoint, metrics.jsonl and plots in {out_dir}")
    if WORLD_SIZE > 1:
        dist.destroy_process_group()
    return history

# ===== Shared plumbing, skippable on a first read: the same in every training script (test_shared.py) ====
SCRIPT = Path(__file__).stem
RANK, WORLD_SIZE = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
LARGE_IMAGE_SIZE = 96  # from here on (STL-10, ImageNet-like folders): the ImageNet stem, the papers' blur
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's models take them
RESUMABLE = {"resume", "epochs", "max_steps", "device", "compile", "dtype", "data_dir"}

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

def shared_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--dataset", default="cifar10", choices=["cifar10", "cifar100", "stl10", "folder", "synthetic"],
        help="synthetic: coloured noise, for checks")
    add("--data-dir", default="./data", help="download folder; for folder: DIR/{train,test}/<class>/<image>")
    add("--subset", type=bounded(int, 0), default=0, help="train on N random training images (0: all)")
    add("--img-size", type=bounded(int, 8), help="resize the images once (default: 96 for STL-10, else 32)")
    add("--epochs", type=bounded(int, 1), help="length of the schedules")
    add("--max-steps", type=bounded(int, 0), default=0, help="stop after this many steps (0: at the end)")
    add("--batch-size", type=bounded(int, 2), help="global batch, over all ranks")
    add("--lr", type=bounded(float, 0), help="learning rate per 256 images, scaled by batch/256")
    add("--weight-decay", type=bounded(float, 0), help="weight decay")
    add("--warmup-epochs", type=bounded(float, 0), help="linear learning-rate warm-up")
    add("--eval-every", type=bounded(int, 1), default=1, help="epochs between kNN evaluations")
    add("--log-every", type=bounded(int, 1), default=50, help="steps between progress lines")
    add("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda if there is a GPU")
    add("--compile", action="store_true", help="torch.compile the model and the views' pixel work")
    add("--dtype", choices=["bfloat16", "float32"], help="autocast precision (default: bfloat16 on CUDA)")
    add("--seed", type=int, default=0, help="seed of the weights, the subset and every batch")
    add("--out-dir", help="run folder (default: runs/<script>-<time>)")
    add("--resume", help="checkpoint.pt of a run to continue, in its folder")
    return parser

def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.img_size = args.img_size or (96 if args.dataset == "stl10" else 32)
    if not args.resume:
        return args, None
    try:
        checkpoint = torch.load(args.resume, map_location="cpu", weights_only=True)
    except Exception as error:  # missing, a folder, truncated, not a checkpoint
        fail(f"cannot read checkpoint {args.resume}: {(str(error).strip() or repr(error)).splitlines()[0]}")
    writer = checkpoint.get("script") if isinstance(checkpoint, dict) else None
    if writer != SCRIPT:
        fail(f"{args.resume} was written by {writer or 'another program'}, not by {SCRIPT}")
    given = {word[2:].split("=")[0].replace("-", "_") for word in argv if word.startswith("--")}
    if given - RESUMABLE:  # a silent mistake: the run keeps its settings
        fail(f"--{', --'.join(sorted(given - RESUMABLE))} cannot change when a run resumes; --epochs, "
             f"--data-dir, --max-steps, --device, --compile and --dtype can".replace("_", "-"))
    resumed = {**vars(args), **checkpoint["args"], "max_steps": 0, **{key: vars(args)[key] for key in given}}
    return argparse.Namespace(**{**resumed, "out_dir": str(Path(args.resume).parent)}), checkpoint

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

@torch.no_grad()
def monitor(backbone, projector, data, ctx):
    """kNN top-1 of the backbone features (given labels); effective rank and collapse of the projections."""
    test = embed(backbone, data["test_x"], ctx)
    z = projector(test)
    metrics = dict(erank=effective_rank(z), eval_collapse=collapse_metric(z).item())
    if len(data["labelled_y"]):
        bank = embed(backbone, data["labelled_x"], ctx)
        metrics["knn_top1"] = knn_top1(bank, data["labelled_y"], test, data["test_y"])
    return metrics

def save_run(out_dir, model, optimizer, args, data, step, history):
    """The checkpoint (plain types, for weights_only=True), metrics.jsonl and the figure, each written to a
    temporary file and renamed, so that a run killed while it writes keeps the last ones."""
    if not all(tensor.isfinite().all() for tensor in model.state_dict().values()):
        fail(f"the weights hold NaN or inf at step {step}; {out_dir}/checkpoint.pt is the last good one")
    torch.save(dict(script=SCRIPT, step=step, args=vars(args), data=data["info"], history=history,
                    model=model.state_dict(), optimizer=optimizer.state_dict()), out_dir / "checkpoint.tmp")
    os.replace(out_dir / "checkpoint.tmp", out_dir / "checkpoint.pt")
    (out_dir / "metrics.tmp").write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(out_dir / "metrics.tmp", out_dir / "metrics.jsonl")
    if history:  # a panel per logged measure; a list (a spectrum) is a line per entry, a missing value a gap
        keys = dict.fromkeys(key for row in history for key in row if type(row[key]) in (float, list))
        fig = Figure(figsize=(16, 3.4 * math.ceil(len(keys) / 4)), layout="tight")
        for index, key in enumerate(keys):  # four panels a row
            ax = fig.add_subplot(math.ceil(len(keys) / 4), 4, index + 1)
            ax.plot([row["epoch"] for row in history], [row.get(key, math.nan) for row in history], ".-")
            ax.set(title=key, xlabel="epoch", yscale="log" if key.endswith("eigenvalues") else "linear")
            ax.grid(alpha=0.3)
        fig.savefig(out_dir / "figure.tmp", format="png", dpi=100)
        os.replace(out_dir / "figure.tmp", out_dir / f"{SCRIPT}.png")

if __name__ == "__main__":
    main()
