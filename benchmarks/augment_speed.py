"""Augmentation throughput: the batched on-device pipeline of the training scripts against
torchvision's per-image PIL pipeline with the same operations (BYOL's second view).

    python benchmarks/augment_speed.py                      # CPU, one thread, batch 256
    python benchmarks/augment_speed.py --data-dir DIR       # on real images (DIR/test/<class>/*)
    python benchmarks/augment_speed.py --device cuda --threads 0
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision.transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import byol  # noqa: E402  (the benchmark measures byol.py's own functions)


def images_per_second(pipelines, batch, repeats, rounds=20):
    """Per pipeline, the best of `rounds` timings of its `repeats` calls, the pipelines taking turns within
    each round: the least disturbed timing of each, and a busy machine slows both alike."""
    best = [float("inf")] * len(pipelines)
    for fn in pipelines:
        fn()  # warm-up
    for _ in range(rounds):
        for i, (fn, count) in enumerate(zip(pipelines, repeats)):
            start = time.perf_counter()
            for _ in range(count):
                fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return [batch * count / seconds for count, seconds in zip(repeats, best)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: leave torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--data-dir", default=None, help="time on images of DIR/test (ImageFolder) "
                   "instead of random pixels")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = byol.setup(byol.parse_args(["--device", args.device])[0])
    device = ctx.device
    view = byol.VIEWS[1]
    if args.data_dir:
        files = sorted(Path(args.data_dir, "test").rglob("*.jpg"))
        chosen = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))[:args.batch_size]
        images = torch.stack([byol.decode((files[i], 0), args.img_size) for i in chosen.tolist()])
    else:
        images = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8)
    on_device = images.to(device)

    def batched():
        byol.augment(on_device, view, ctx)
        if device.type == "cuda":
            torch.cuda.synchronize()

    per_image = T.Compose([
        T.RandomResizedCrop(args.img_size, scale=view["crop_scale"], antialias=True),
        T.RandomHorizontalFlip(view["flip"]),
        T.RandomApply([T.ColorJitter(view["brightness"], view["contrast"], view["saturation"], view["hue"])],
                      p=view["jitter"]),
        T.RandomGrayscale(view["grayscale"]),
        T.RandomSolarize(128, p=view["solarize"]),
        T.ToTensor(),
        T.Normalize(byol.MEAN, byol.STD),
    ])
    pil_images = [T.functional.to_pil_image(image) for image in images]

    def pil():
        torch.stack([per_image(image) for image in pil_images])

    fast, slow = images_per_second([batched, pil], args.batch_size, [args.repeats, max(2, args.repeats // 4)])
    print(f"batched on {device} ({torch.get_num_threads()} threads): {fast:,.0f} images/s")
    print(f"torchvision PIL, per image: {slow:,.0f} images/s")
    print(f"speed-up: {fast / slow:.1f}x")
    return fast, slow


if __name__ == "__main__":
    main()
