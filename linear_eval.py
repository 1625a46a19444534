"""Linear evaluation: how linearly separable are the features a self-supervised backbone learnt?

The standard linear protocol (SimSiam Sec. 4.2, BYOL Sec. 4.1) on the checkpoint of any training script here:
the script rebuilds its model and loads the checkpoint into it strictly, and the backbone it evaluates (DINO's
teacher's) embeds every image once, un-augmented, in eval mode. On these features a batch norm without affine
parameters (a fixed affine map at test time, so that the classifier stays linear) and a Linear layer are
trained with cross-entropy and Adam, 100 epochs of batch 256, the learning rate decayed linearly per step from
5e-2 to 5e-4, no weight decay: the linear evaluation of the DirectPred reproduction by Bogatov Wilkman,
Miszkurka and Hoeppe (KTH, Sec. 4). Reported: top-1 and top-5 after the last epoch (the best epoch would be
chosen on the test set), and kNN top-1 (k = 20 and 200) on the same features. The classifier and the kNN
memory bank take every labelled training image, whatever --subset the run trained on.

Usage:
    python linear_eval.py runs/byol-<time>/checkpoint.pt              # the checkpoint's dataset
    python linear_eval.py CKPT --data-dir DIR                         # its images moved to DIR
    python linear_eval.py CKPT --dataset cifar100                     # another dataset (transfer)
    python linear_eval.py CKPT --subset 5000 --epochs 10 --device cpu # a quick check
Writes linear_eval.json and linear_eval.png next to the checkpoint (or into --out-dir).
"""
import argparse
import importlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure

SCRIPTS = ("byol", "simsiam", "directpred", "directcopy", "dino_vit")
DATASETS = ("cifar10", "cifar100", "stl10", "folder", "synthetic")  # the training scripts' --dataset

def fail(message):
    raise SystemExit(f"{Path(__file__).stem}.py: error: {message}")

def load_run(path, dataset=None, data_dir=None, subset=0, device="auto"):
    """A checkpoint's training script, its settings, and its model with the checkpoint's weights (strictly):
    what both evaluation tools start from. A one-line error for a file that is none of these."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # missing, truncated, not a checkpoint
        fail(f"cannot read checkpoint {path}: {(str(error).strip() or repr(error)).splitlines()[0]}")
    if not isinstance(checkpoint, dict) or checkpoint.get("script") not in SCRIPTS:
        fail(f"{path} is not a checkpoint of a training script here ({', '.join(SCRIPTS)})")
    script, saved = importlib.import_module(checkpoint["script"]), checkpoint["args"]
    args = argparse.Namespace(**{**saved, "dataset": dataset or saved["dataset"], "subset": subset,
                                 "data_dir": data_dir or saved["data_dir"], "batch_size": 2,
                                 "device": device})
    model = script.build_model(args)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:
        fail(f"the weights of {path} do not fit its script: {' '.join(str(error).split())[:150]}")
    return script, args, checkpoint, model

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("checkpoint", help="checkpoint.pt of a training script")
    add("--dataset", choices=DATASETS, help="evaluate on another dataset (default: the checkpoint's)")
    add("--data-dir", help="where the images are now (default: the checkpoint's --data-dir)")
    add("--subset", type=int, default=0, help="the classifier's N training images (0: all)")
    add("--epochs", type=int, default=100, help="epochs of the classifier")
    add("--batch-size", type=int, default=256, help="batch of the classifier")
    add("--lr", type=float, default=5e-2, help="Adam's learning rate, decayed linearly to lr/100")
    add("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda if there is a GPU")
    add("--seed", type=int, default=0, help="seed of the classifier's initialisation and batches")
    add("--out-dir", help="folder of the outputs (default: the checkpoint's)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 2 or args.subset < 0 or not 0 < args.lr < math.inf:
        parser.error("--epochs and --lr must be positive, --batch-size at least 2, --subset not negative")
    script, run_args, checkpoint, model = load_run(args.checkpoint, args.dataset, args.data_dir, args.subset,
                                                   args.device)
    if run_args.dataset == "folder" and not (Path(run_args.data_dir) / "train").is_dir():
        fail(f"linear evaluation needs labels, and {run_args.data_dir} has no train/<class>/ folders: give "
             "labelled images with --data-dir DIR (DIR/{train,test}/<class>/*) or --dataset")
    ctx = script.setup(run_args)
    data = script.load_data(run_args, ctx.device)
    if len(data["labelled_y"]) < args.batch_size:
        fail(f"it takes --batch-size {args.batch_size} labelled training images, and {run_args.dataset} at "
             f"{run_args.data_dir} has {len(data['labelled_y'])}")
    backbone, _ = script.networks(model.to(ctx.device, memory_format=torch.channels_last).eval())
    started = time.time()
    train_x, train_y = script.embed(backbone, data["labelled_x"], ctx), data["labelled_y"]
    test_x, test_y = script.embed(backbone, data["test_x"], ctx), data["test_y"]
    print(f"linear_eval: {checkpoint['script']}.py step {checkpoint['step']}, {len(train_x)} training and "
          f"{len(test_x)} test images, {train_x.shape[1]}-d features ({time.time() - started:.1f} s)",
          flush=True)

    torch.manual_seed(args.seed)
    classes = data["info"]["classes"]
    classifier = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False),
                               nn.Linear(train_x.shape[1], len(classes))).to(ctx.device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=args.lr)
    steps_per_epoch = len(train_x) // args.batch_size
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.01, args.epochs * steps_per_epoch)
    history = []
    for epoch in range(args.epochs):
        classifier.train()
        losses = []
        order = torch.randperm(len(train_x), device=ctx.device)[:steps_per_epoch * args.batch_size]
        for batch in order.view(steps_per_epoch, -1):
            loss = F.cross_entropy(classifier(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.detach())
        with torch.no_grad():
            hits = classifier.eval()(test_x).topk(min(5, len(classes)), dim=1).indices == test_y[:, None]
        history.append(dict(epoch=epoch + 1, loss=torch.stack(losses).mean().item(),
                            top1=hits[:, 0].float().mean().item(),
                            top5=hits.any(dim=1).float().mean().item()))
        if not math.isfinite(history[-1]["loss"]):
            fail(f"the classifier's loss is {history[-1]['loss']} at epoch {epoch + 1}; try a lower --lr")
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1}/{args.epochs} | " + " | ".join(
                f"{key} {value:.4f}" for key, value in history[-1].items() if key != "epoch"), flush=True)
    per_class = torch.bincount(test_y, hits[:, 0].float(), minlength=len(classes))
    per_class /= torch.bincount(test_y, minlength=len(classes)).clamp_min(1)
    knn = {k: script.knn_top1(train_x, train_y, test_x, test_y, k=k) for k in (20, 200)}

    result = dict(checkpoint=str(args.checkpoint), script=checkpoint["script"], step=checkpoint["step"],
                  dataset=run_args.dataset, num_train=len(train_x), num_test=len(test_x),
                  feature_dim=train_x.shape[1], linear_top1=history[-1]["top1"],
                  linear_top5=history[-1]["top5"], knn_top1_k20=knn[20], knn_top1_k200=knn[200],
                  per_class_top1=dict(zip(classes, per_class.tolist())),
                  protocol=dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
                  history=history)
    out_dir = Path(args.out_dir or Path(args.checkpoint).parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "linear_eval.json").write_text(json.dumps(result, indent=1) + "\n")
    fig = Figure(figsize=(15, 3.8), layout="tight")
    loss_ax, top1_ax, class_ax = fig.subplots(1, 3, gridspec_kw=dict(width_ratios=[1, 1, 1.4]))
    epochs = [row["epoch"] for row in history]
    loss_ax.plot(epochs, [row["loss"] for row in history])
    loss_ax.set(title="training loss (cross-entropy)", xlabel="epoch")
    top1_ax.plot(epochs, [row["top1"] for row in history], label="linear")
    top1_ax.axhline(knn[200], color="grey", linestyle="--", label="kNN, k = 200")
    top1_ax.set(title=f"test top-1 (last epoch {result['linear_top1']:.2%})", xlabel="epoch", ylim=(0, 1))
    top1_ax.legend()
    class_ax.bar(range(len(classes)), per_class.tolist())
    class_ax.set(title="test top-1 per class, last epoch", ylim=(0, 1))
    if len(classes) <= 20:
        class_ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    fig.suptitle(f"linear evaluation of {result['script']}.py, step {result['step']}: {args.checkpoint}")
    fig.savefig(out_dir / "linear_eval.png", dpi=100)
    print(f"done: linear top-1 {result['linear_top1']:.2%}, top-5 {result['linear_top5']:.2%} (last epoch), "
          f"kNN top-1 {knn[20]:.2%} (k = 20), {knn[200]:.2%} (k = 200); wrote {out_dir / 'linear_eval.json'}")
    return result

if __name__ == "__main__":
    main()
