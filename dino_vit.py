"""DINO: self-distillation with no labels (Caron et al., ICCV 2021, arXiv:2104.14294), a small ViT.

Idea: a student ViT learns to give, on every crop of an image (2 global crops, several small local ones),
the distribution over K prototypes that a teacher gives on the global crops. The teacher is an EMA of the
student; its output is centred (minus a running mean) and sharpened (a low temperature). Centring alone
collapses to the uniform distribution, sharpening alone to one prototype (Sec. 5.3). Three measures of the
teacher's output P_t tell the modes apart:
  - teacher_entropy, h(P_t): log K under uniform collapse, 0 under one-prototype collapse (and also for a
    sharp teacher that sends different images to different prototypes);
  - kl_teacher_center, the mean KL(P_t || batch mean of P_t), the mutual information between image and
    prototype: 0 in both collapses, high when the teacher sends images to different prototypes;
  - kl_teacher_student, the loss minus h(P_t) (DINO Fig. 7): 0 in both collapses.
At every evaluation attention.png shows the teacher's last-block [CLS] attention on 8 test images, a map
per head: the maps of DINO Fig. 1, forming as the run trains (and failing to under the two collapses).

Usage:
    python dino_vit.py --epochs 100                                  # CIFAR-10, downloaded to ./data
    python dino_vit.py --dataset folder --data-dir DIR               # DIR/train/<class>/*, DIR/test/<class>/*
    python dino_vit.py --no-centering                                # collapse: one prototype dominates
    python dino_vit.py --no-sharpening                               # collapse: uniform output
    python dino_vit.py --resume runs/dino_vit-<time>/checkpoint.pt   # continue a stopped run
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
from torchvision.ops import stochastic_depth
from torchvision.transforms.v2 import functional as TF

# ===== Hyperparameters: each entry is the default of the flag of the same name, with its source ===
RECIPE = dict(
    epochs=100,                     # as the other scripts (DINO trains 100-800 ImageNet epochs)
    batch_size=512,                 # as byol.py and simsiam.py (official: 1024 over 16 GPUs)
    # The loss is Eq. 3 averaged over the crop pairs, the official code's scale, which clip_grad assumes.
    lr=5e-4,                        # Sec. 3.2 and official code: 0.0005 x batch/256
    weight_decay=0.04,              # official code: a cosine from 0.04 to 0.4
    weight_decay_end=0.4,
    warmup_epochs=10,               # Sec. 3.2: 10 linear warm-up epochs, then a cosine to 0
    patch_size=4, dim=256, depth=6, heads=4, mlp_dim=1024,  # a CIFAR-sized ViT (ViT-S: 16, 384, 12, 6, 1536)
    drop_path=0.1,                  # official code: stochastic depth 0.1 on the student
    head_hidden=2048,               # Sec. 3.1: head MLP 2048 -> 2048 -> 256, then K prototypes
    bottleneck_dim=256,
    out_dim=4096,                   # K; solo-learn's CIFAR DINO uses 4096 prototypes (ImageNet: 65536)
    local_crops=6,                  # Sec. 3.1: 2 global crops and several local ones (official default 8)
    student_temp=0.1,               # Sec. 3.1 and official code
    teacher_temp_start=0.04,        # Sec. 3.2 and official code: 0.04 warmed up linearly to 0.07 ...
    teacher_temp=0.07,
    teacher_temp_warmup_epochs=30,  # ... over the first 30 epochs
    center_momentum=0.9,            # Eq. 4 and official code
    ema_start=0.996,                # Sec. 3.1: teacher EMA momentum 0.996, cosine to 1
    clip_grad=3.0,                  # official code: each parameter's gradient norm clipped at 3
    freeze_last_layer_epochs=1,     # official code: the prototypes stay fixed in the first epoch
)
# Multi-crop (Sec. 3.1, official code): BYOL's flip, jitter and grayscale, DINO's asymmetric global pair,
# local crops at half size. Blur sigma 0.1-2 px of a 224-px image, scaled: nearly none at 32 px (lightly's
# and solo-learn's CIFAR recipes).
VIEW = dict(crop_scale=(0.4, 1.0), flip=0.5, jitter=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
            hue=0.1, grayscale=0.2, solarize=0.0, blur=1.0, blur_sigma=(0.1, 2.0))
VIEWS = (VIEW, {**VIEW, "blur": 0.1, "solarize": 0.2})
LOCAL_VIEW = {**VIEW, "crop_scale": (0.05, 0.4), "blur": 0.5}

# ===== The method: model, loss, optimiser, schedules and one training step ========================
class ViT(nn.Module):
    """A pre-norm Vision Transformer (Dosovitskiy et al. 2021): the final [CLS] token, or with attention_maps
    the last block's [CLS] attention to each patch, (B, heads, H / patch, W / patch), DINO Fig. 1 and 3. The
    stochastic-depth rate rises linearly from 0 at the first block to drop_path at the last."""
    def __init__(self, img_size, patch_size, dim, depth, heads, mlp_dim, drop_path=0.0):
        super().__init__()
        self.heads = heads
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img_size // patch_size) ** 2, dim))
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            attn_norm=nn.LayerNorm(dim), qkv=nn.Linear(dim, 3 * dim), attn_out=nn.Linear(dim, dim),
            mlp_norm=nn.LayerNorm(dim), mlp=nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(
                mlp_dim, dim)))) for _ in range(depth))
        self.drop_path_rates = torch.linspace(0, drop_path, depth).tolist()
        self.norm = nn.LayerNorm(dim)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)

    def attention(self, block, x, cls_weights=False):
        qkv = block["qkv"](block["attn_norm"](x)).unflatten(-1, (3, self.heads, -1))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (batch, heads, tokens, dim / heads)
        if cls_weights:  # the [CLS] query's softmax over all tokens, on the patches: (batch, heads, patches)
            return torch.einsum("bhd,bhtd->bht", q[:, :, 0], k).mul(q.shape[-1] ** -0.5).softmax(-1)[..., 1:]
        return block["attn_out"](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    def forward(self, images, attention_maps=False):
        patches = self.patch_embed(images)  # (B, dim, H / patch, W / patch)
        x = torch.cat([self.cls_token.expand(len(images), -1, -1), patches.flatten(2).transpose(1, 2)], dim=1)
        side = math.isqrt(self.pos_embed.shape[1] - 1)  # the learned grid, resized (bicubic) to the crop's
        grid = self.pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=patches.shape[-2:], mode="bicubic").flatten(2).transpose(1, 2)
        x = x + torch.cat([self.pos_embed[:, :1], grid], dim=1)
        for block, rate in zip(self.blocks, self.drop_path_rates):
            if attention_maps and block is self.blocks[-1]:
                return self.attention(block, x, cls_weights=True).unflatten(-1, patches.shape[-2:])
            x = x + stochastic_depth(self.attention(block, x), rate, "row", self.training)
            x = x + stochastic_depth(block["mlp"](block["mlp_norm"](x)), rate, "row", self.training)
        return self.norm(x[:, 0])

def init_linear(module):
    """ViT's and DINO's initialisation of linear layers: truncated normal (std 0.02), zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)

class DINOHead(nn.Module):
    """Three linear layers with GELU to a bottleneck (Sec. 3.1), l2-normalisation, then a weight-normalised
    linear layer to K prototype scores. The weight norm's magnitude is held at 1 (the official default): every
    score is a cosine in [-1, 1], and the temperatures alone set how peaked a softmax is."""
    def __init__(self, in_dim, hidden_dim, bottleneck_dim, out_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim)).apply(init_linear)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, False))
        nn.init.ones_(self.last_layer.parametrizations.weight.original0).requires_grad_(False)

    def forward(self, x):
        """Prototype scores, in float32 (they are divided by a temperature of 0.04), and the bottleneck."""
        bottleneck = self.mlp(x)
        with torch.autocast(x.device.type, enabled=False):
            return self.last_layer(F.normalize(bottleneck.float(), dim=-1)), bottleneck

class DINO(nn.Module):
    def __init__(self, vit_kwargs, drop_path, head_hidden, bottleneck_dim, out_dim, centering, student_temp,
                 center_momentum):
        super().__init__()
        self.backbone = ViT(**vit_kwargs, drop_path=drop_path)
        self.head = DINOHead(vit_kwargs["dim"], head_hidden, bottleneck_dim, out_dim)
        # The teacher starts as a copy of the student, without drop-path; only the EMA moves it (Sec. 3.1).
        self.teacher_backbone = ViT(**vit_kwargs).requires_grad_(False)
        self.teacher_backbone.load_state_dict(self.backbone.state_dict())
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.centering, self.student_temp, self.center_momentum = centering, student_temp, center_momentum
        self.register_buffer("center", torch.zeros(out_dim))  # stays 0 without centring

    def forward(self, views, teacher_temp):
        """dino_loss's three values and the teacher's bottleneck of the first global crop. views: both global
        crops of B images (2B, 3, H, W), then any local ones (nB, 3, h, w)."""
        batch = len(views[0]) // 2
        features = torch.cat([self.backbone(crops) for crops in views])  # a pass per crop size (official)
        student_logits = self.head(features)[0].unflatten(0, (-1, batch))
        with torch.no_grad():  # only the global crops pass through the teacher (Sec. 3.1)
            teacher_logits, teacher_bottleneck = self.teacher_head(self.teacher_backbone(views[0]))
        loss, entropy, center_kl = dino_loss(student_logits, teacher_logits.unflatten(0, (2, batch)),
                                             self.center, teacher_temp, self.student_temp)
        if self.centering:  # Eq. 4: c <- m c + (1 - m) batch mean (under torchrun, of the global batch)
            mean = teacher_logits.mean(dim=0) / WORLD_SIZE  # summed over the ranks below
            if WORLD_SIZE > 1:
                dist.all_reduce(mean)
            self.center.lerp_(mean, 1 - self.center_momentum)
        return loss, entropy, center_kl, teacher_bottleneck[:batch]

    @torch.no_grad()
    def update_teacher(self, momentum):
        """teacher <- momentum * teacher + (1 - momentum) * student, every tensor in one fused call."""
        student = [*self.backbone.parameters(), *self.head.parameters()]
        teacher = [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()]
        torch._foreach_lerp_(teacher, student, 1 - momentum)

def dino_loss(student_logits, teacher_logits, center, teacher_temp, student_temp):
    """DINO Eq. 3: the cross-entropy H(P_t, P_s) between the teacher's centred, sharpened softmax on each
    global crop and the student's softmax on every other crop, averaged over those pairs. student_logits
    (V, B, K), the 2 global crops first; teacher_logits (2, B, K). Also h(P_t) and KL(P_t || mean of P_t)."""
    teacher_log_probs = F.log_softmax((teacher_logits - center) / teacher_temp, dim=-1)
    teacher_probs = teacher_log_probs.exp()
    student_log_probs = F.log_softmax(student_logits / student_temp, dim=-1)
    # cross_entropy[t, v]: the batch mean of H(P_t, P_s) for teacher crop t and student crop v, in float32
    with torch.autocast(teacher_probs.device.type, enabled=False):  # autocast would contract in bf16
        cross_entropy = -torch.einsum("tbk,vbk->tv", teacher_probs, student_log_probs) / len(teacher_probs[0])
    loss = (cross_entropy.sum() - cross_entropy.trace()) / (cross_entropy.numel() - 2)  # no crop with itself
    entropy = -(teacher_probs * teacher_log_probs).sum(dim=-1).mean()
    # mean_i KL(P_i || P), P the mean of the P_i, is h(P) - mean_i h(P_i)
    return loss, entropy, torch.special.entr(teacher_probs.flatten(0, 1).mean(dim=0)).sum() - entropy

def build_model(args):
    crops = [args.img_size, args.img_size // 2] if args.local_crops else [args.img_size]
    if args.dim % args.heads or any(size % args.patch_size for size in crops):
        fail(f"--dim {args.dim} must be a multiple of --heads {args.heads}, and --patch-size "
             f"{args.patch_size} divide the crop sizes {crops}")
    vit_kwargs = dict(img_size=args.img_size, patch_size=args.patch_size, dim=args.dim, depth=args.depth,
                      heads=args.heads, mlp_dim=args.mlp_dim)
    return DINO(vit_kwargs, args.drop_path, args.head_hidden, args.bottleneck_dim, args.out_dim,
                not args.no_centering, args.student_temp, args.center_momentum)

def networks(model):
    """The teacher's backbone and head MLP (it outperforms the student, Sec. 5.2), for kNN and the tools."""
    return model.teacher_backbone, model.teacher_head.mlp

def make_optimizer(model, args):
    """AdamW with PyTorch's betas (official); the scheduled weight decay (group 0) on weights only."""
    trainable = [param for param in model.parameters() if param.requires_grad]
    groups = [dict(params=[param for param in trainable if param.ndim > 1]),
              dict(params=[param for param in trainable if param.ndim <= 1], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=args.lr * args.batch_size / 256, weight_decay=args.weight_decay,
                             fused=True)

def schedules(step, steps_per_epoch, args):
    """The lr, weight decay, teacher temperature, EMA momentum and prototype freeze at `step` (Sec. 3.2)."""
    total, warmup = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    warmed = min(1, step / max(1, args.teacher_temp_warmup_epochs * steps_per_epoch))
    teacher_temp = args.teacher_temp_start + (args.teacher_temp - args.teacher_temp_start) * warmed
    return dict(lr=cosine(step, total, args.lr * args.batch_size / 256, 0.0, warmup),
                weight_decay=cosine(step, total, args.weight_decay, args.weight_decay_end),
                teacher_temp=args.student_temp if args.no_sharpening else teacher_temp,
                ema=cosine(step, total, args.ema_start, 1.0),
                freeze_last_layer=step < args.freeze_last_layer_epochs * steps_per_epoch)

def train_step(model, forward, optimizer, images, hyper, args, ctx):
    """One step of DINO (Algorithm 1): the global and local crops, the loss, an AdamW step of the student with
    each gradient clipped and the prototypes frozen early on, the EMA of the teacher."""
    for group in optimizer.param_groups:
        group["lr"] = hyper["lr"]
    optimizer.param_groups[0]["weight_decay"] = hyper["weight_decay"]
    views = [torch.cat([augment(images, view, ctx) for view in VIEWS])]  # the 2 global crops
    if args.local_crops:  # and the local ones, at half the image size
        views.append(augment(images, LOCAL_VIEW, ctx, args.img_size // 2, args.local_crops))
    teacher_temp = torch.full((), hyper["teacher_temp"], device=images.device)  # a float would recompile
    torch.manual_seed(torch.initial_seed() + (RANK + 1) * 2**40)  # drop-path: each rank draws its own
    with ctx.autocast:
        loss, entropy, center_kl, bottleneck = forward(views, teacher_temp)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # Each parameter's gradient clipped to norm clip_grad on its own (official code), fused, no host sync.
    grads = [param.grad for param in model.parameters() if param.grad is not None]
    norms = torch.stack(torch._foreach_norm(grads))
    torch._foreach_mul_(grads, list((args.clip_grad / (norms + 1e-6)).clamp(max=1)))
    if hyper["freeze_last_layer"]:  # official code: fixed prototypes help the start
        model.head.last_layer.parametrizations.weight.original1.grad = None
    optimizer.step()
    model.update_teacher(hyper["ema"])
    return dict(loss=loss.detach(), collapse=collapse_metric(bottleneck), teacher_entropy=entropy,
                kl_teacher_center=center_kl, kl_teacher_student=loss.detach() - entropy)

def evaluate(model, data, ctx):
    """The teacher's kNN monitor, and attention.png: its maps of 8 test images (Sec. 4.2.1, Fig. 1 and 3)."""
    images = data["test_x"][::max(1, len(data["test_x"]) // 8)][:8]  # spread: several classes
    maps = embed(lambda x: model.teacher_backbone(x, attention_maps=True), images, ctx).cpu().numpy()
    fig = Figure(figsize=(len(images), 1 + maps.shape[1]))
    axes = fig.subplots(1 + maps.shape[1], len(images), squeeze=False, subplot_kw=dict(xticks=[], yticks=[]))
    for column, image in enumerate(images.permute(0, 2, 3, 1).cpu().numpy()):
        axes[0, column].imshow(image)
        for head, ax in enumerate(axes[1:, column]):
            ax.imshow(maps[column, head], cmap="inferno", interpolation="nearest")
    fig.suptitle("the teacher's last-block [CLS] attention: each image, then a row per head")
    fig.savefig(ctx.out_dir / "attention.png", dpi=100)
    return monitor(*networks(model), data, ctx)

def build_parser():
    parser = shared_parser()
    add = parser.add_argument
    add("--weight-decay-end", type=bounded(float, 0), help="weight decay at the end, a cosine from the start")
    add("--patch-size", type=bounded(int, 1), help="ViT patch size")
    add("--dim", type=bounded(int, 1), help="ViT width")
    add("--depth", type=bounded(int, 1), help="ViT blocks")
    add("--heads", type=bounded(int, 1), help="attention heads per block")
    add("--mlp-dim", type=bounded(int, 1), help="hidden width of the blocks' MLP")
    add("--drop-path", type=bounded(float, 0, 1, below=True), help="stochastic depth of the student's end")
    add("--head-hidden", type=bounded(int, 1), help="hidden width of the head MLP")
    add("--bottleneck-dim", type=bounded(int, 1), help="output width of the head MLP")
    add("--out-dim", type=bounded(int, 1), help="K, the number of prototypes")
    add("--local-crops", type=bounded(int, 0), help="local crops per image, at half the image size")
    add("--student-temp", type=bounded(float, 1e-3), help="student softmax temperature")
    add("--teacher-temp-start", type=bounded(float, 1e-3), help="teacher temperature at step 0")
    add("--teacher-temp", type=bounded(float, 1e-3), help="teacher temperature after its warm-up")
    add("--teacher-temp-warmup-epochs", type=bounded(float, 0), help="warm-up of the teacher temperature")
    add("--center-momentum", type=bounded(float, 0, 1), help="EMA momentum of the centre")
    add("--ema-start", type=bounded(float, 0, 1), help="teacher EMA momentum at step 0, cosine to 1")
    add("--clip-grad", type=bounded(float, 0), help="largest gradient norm of any one parameter")
    add("--freeze-last-layer-epochs", type=bounded(float, 0), help="epochs with the prototypes held fixed")
    add("--no-centering", action="store_true", help="ablation: no centring of the teacher output")
    add("--no-sharpening", action="store_true", help="ablation: the teacher temperature is the student's")
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
