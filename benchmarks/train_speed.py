"""Training speed of every script: images per second of its train_step (both views' augmentation
included) after a warm-up, the evaluation (kNN monitor and collapse metrics) timed apart, peak GPU
memory, and on CUDA the host syncs per step (torch.cuda.set_sync_debug_mode, target 0). On a CPU it
also times BYOL built from lightly's modules, with the same backbone and heads and its PIL transforms
in DataLoader workers, when the `lightly` package is installed (it is not a requirement).

    python benchmarks/train_speed.py                              # every script, on the GPU if there is one
    python benchmarks/train_speed.py --scripts byol --batch-size 128 --steps 10 --out speed.json
    python benchmarks/train_speed.py --compile                    # the scripts' --compile path

The images are random pixels at --img-size: the step's cost does not depend on what they show.
"""
import argparse
import importlib
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SCRIPTS = ["byol", "simsiam", "directpred", "directcopy", "dino_vit"]


def synthetic_data(args, device, num_train, num_test):
    """Random uint8 images and labels in the layout load_data gives, on the device."""
    def images(n):
        return torch.randint(0, 256, (n, 3, args.img_size, args.img_size), dtype=torch.uint8, device=device)

    train_x, labels = images(num_train), torch.arange(num_train, device=device) % 10
    return dict(train_x=train_x, labelled_x=train_x, labelled_y=labels, test_x=images(num_test),
                test_y=torch.arange(num_test, device=device) % 10)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_script(name, options):
    """Images per second of `steps` training steps after `warmup` steps, syncs per step (CUDA), peak memory
    (CUDA), and the seconds of one evaluation."""
    script = importlib.import_module(name)
    flags = ["--batch-size", str(options.batch_size), "--img-size", str(options.img_size), "--device",
             options.device]
    args = script.parse_args(flags + (["--compile"] if options.compile else []))[0]
    ctx = script.setup(args)
    ctx.out_dir = Path(tempfile.mkdtemp())  # where dino_vit.py's evaluation draws its attention maps
    device = ctx.device
    cuda = device.type == "cuda"
    num_train = options.eval_train or (50_000 if cuda else 2_000)
    num_test = options.eval_test or (10_000 if cuda else 500)
    data = synthetic_data(args, device, max(num_train, options.batch_size), num_test)
    torch.manual_seed(0)
    model = script.build_model(args).to(device, memory_format=torch.channels_last)
    optimizer = script.make_optimizer(model, args)
    if args.compile:
        model.compile()
    steps_per_epoch = len(data["train_x"]) // args.batch_size

    def step(i):
        batch = torch.randint(0, len(data["train_x"]), (args.batch_size,), device=device)
        hyper = script.schedules(i, steps_per_epoch, args)
        return script.train_step(model, model, optimizer, data["train_x"][batch], hyper, args, ctx)

    for i in range(options.warmup):
        step(i)
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seconds = float("inf")  # the best of the rounds: the least disturbed by other processes
        for round_ in range(options.rounds):
            start = time.perf_counter()
            for i in range(options.warmup + round_ * options.steps,
                           options.warmup + (round_ + 1) * options.steps):
                metrics = step(i)
            synchronize(device)
            seconds = min(seconds, time.perf_counter() - start)
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in caught) / options.rounds if cuda else None
    loss = metrics["loss"].item()

    synchronize(device)
    start = time.perf_counter()
    script.evaluate(model.eval(), data, ctx)
    model.train()
    synchronize(device)
    return dict(script=name, device=str(device), batch_size=args.batch_size, img_size=args.img_size,
                compile=args.compile, steps=options.steps,
                images_per_s=options.steps * args.batch_size / seconds,
                step_ms=1000 * seconds / options.steps,
                syncs_per_step=None if syncs is None else syncs / options.steps,
                peak_memory_gb=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                evaluation_s=time.perf_counter() - start, evaluation_images=(num_train, num_test), loss=loss)


def time_lightly_peer(options):
    """BYOL from lightly's modules (heads, loss, momentum update, BYOL transforms without blur, as its
    CIFAR-10 benchmark), on byol.py's backbone, fed by a DataLoader of PIL images with --workers
    processes. None without the lightly package."""
    try:
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import update_momentum
        from lightly.transforms.byol_transform import BYOLTransform, BYOLView1Transform, BYOLView2Transform
    except ImportError:
        return None
    import copy

    import numpy as np
    import torch.nn as nn
    from PIL import Image

    import byol

    transform = BYOLTransform(view_1_transform=BYOLView1Transform(input_size=options.img_size,
                                                                  gaussian_blur=0.0),
                              view_2_transform=BYOLView2Transform(input_size=options.img_size,
                                                                  gaussian_blur=0.0))
    rng = np.random.default_rng(0)
    pil_images = [Image.fromarray(rng.integers(0, 256, (options.img_size, options.img_size, 3),
                                               dtype=np.uint8))
                  for _ in range(2_000)]

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(pil_images)

        def __getitem__(self, i):
            return transform(pil_images[i])

    loader = torch.utils.data.DataLoader(Images(), batch_size=options.batch_size, shuffle=True,
                                         drop_last=True,
                                         num_workers=options.workers, persistent_workers=options.workers > 0)
    torch.manual_seed(0)
    backbone = byol.resnet18(options.img_size)
    projector, predictor = BYOLProjectionHead(512, 4096, 256), BYOLPredictionHead(256, 4096, 256)
    online = nn.Sequential(backbone, projector)
    target = copy.deepcopy(online).requires_grad_(False)
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD([*online.parameters(), *predictor.parameters()], lr=0.06, momentum=0.9,
                                weight_decay=5e-4)
    done, start, seconds = 0, None, float("inf")
    while done < options.warmup + options.rounds * options.steps:
        for view0, view1 in loader:
            if done >= options.warmup and (done - options.warmup) % options.steps == 0:
                if start is not None:
                    seconds = min(seconds, time.perf_counter() - start)
                start = time.perf_counter()
            update_momentum(online, target, m=0.99)
            p0, p1 = predictor(online(view0)), predictor(online(view1))
            with torch.no_grad():
                z0, z1 = target(view0), target(view1)
            loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == options.warmup + options.rounds * options.steps:
                break
    seconds = min(seconds, time.perf_counter() - start)
    return dict(script="lightly BYOL (peer)", device="cpu", batch_size=options.batch_size,
                img_size=options.img_size,
                workers=options.workers, steps=options.steps,
                images_per_s=options.steps * options.batch_size / seconds,
                step_ms=1000 * seconds / options.steps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--scripts", default=",".join(SCRIPTS),
                        help="comma-separated, from: " + ", ".join(SCRIPTS))
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="auto: cuda if there is a GPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 512 on CUDA, 128 elsewhere")
    parser.add_argument("--img-size", type=int, default=32, help="image size")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps (default: 50 on CUDA, 5 elsewhere)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default: 10 on CUDA, else 2)")
    parser.add_argument("--eval-train", type=int, default=0,
                        help="kNN memory bank (default: 50000 on CUDA, 2000)")
    parser.add_argument("--eval-test", type=int, default=0,
                        help="kNN test images (default: 10000 on CUDA, 500)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="timed rounds of --steps steps; the best one counts")
    parser.add_argument("--compile", action="store_true", help="the scripts' --compile path")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the lightly peer")
    parser.add_argument("--no-peer", action="store_true", help="skip the lightly peer on a CPU")
    parser.add_argument("--out", default=None, help="also write the rows to this JSON file")
    options = parser.parse_args(argv)
    cuda = options.device in ("auto", "cuda") and torch.cuda.is_available()
    options.batch_size = options.batch_size or (512 if cuda else 128)
    options.steps = options.steps or (50 if cuda else 5)
    options.warmup = options.warmup if options.warmup is not None else (10 if cuda else 2)

    rows = [time_script(name, options) for name in options.scripts.split(",")]
    if not cuda and not options.no_peer:
        peer = time_lightly_peer(options)
        if peer:
            ours = next((row for row in rows if row["script"] == "byol"), None)
            if ours:
                peer["ours_over_peer"] = ours["images_per_s"] / peer["images_per_s"]
            rows.append(peer)
    print(f"{'script':>20} | {'img/s':>8} | {'ms/step':>8} | {'syncs/step':>10} | {'peak GB':>7} | "
          f"{'eval s':>7}")
    for row in rows:
        syncs, peak = row.get("syncs_per_step"), row.get("peak_memory_gb")
        print(f"{row['script']:>20} | {row['images_per_s']:8.1f} | {row['step_ms']:8.1f} | "
              f"{'-' if syncs is None else f'{syncs:.2f}':>10} | "
              f"{'-' if peak is None else f'{peak:.2f}':>7} | "
              f"{row['evaluation_s'] if 'evaluation_s' in row else float('nan'):7.2f}")
    if any("ours_over_peer" in row for row in rows):
        print(f"byol.py / lightly peer: {rows[-1]['ours_over_peer']:.2f}x images per second")
    if options.out:
        Path(options.out).write_text(json.dumps(dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                                                     rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
