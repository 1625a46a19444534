"""Spectra of what a self-supervised network learnt: where, and how far, it collapsed.

Complete collapse maps every image to one point; dimensional collapse (Jing et al. 2021, "Understanding
Dimensional Collapse in Contrastive Self-supervised Learning", Fig. 2) leaves the embeddings spread over fewer
dimensions than they have: covariance eigenvalues that drop to zero. For the checkpoint of any training script
here (its model rebuilt by the script and loaded strictly) this tool embeds the test images in float32 (bf16
would lay a noise floor over the small eigenvalues) and reports, at the backbone and the projector output: the
eigenvalues of the covariance of the l2-normalised embeddings, largest first, on a log scale (Jing et al. Fig.
2); the effective rank of the training scripts' log (Roy & Vetterli 2007, of the uncentred embedding: one
point has rank 1, where a centred spectrum is all zeros); and the collapse metric.

With a linear predictor W_p and its running correlation F-hat (directpred.py, directcopy.py and their
--predictor sgd baseline) it also checks the assumptions of DirectPred (Tian et al. 2021, Sec. 4-5): the
eigenvalues of F-hat and W_p, the alignment of every eigenvector of F-hat with W_p, the asymmetry of W_p and
the smallest eigenvalue of its symmetric part, at the end and over training (the KTH reproduction's Fig. 2).

Usage:
    python spectrum.py runs/byol-<time>/checkpoint.pt                     # one checkpoint
    python spectrum.py runs/*/checkpoint.pt --out runs/spectrum           # several, on one figure
Writes <out>.json, <out>.png and, with a linear predictor, <out>-predictor.png (default --out: the first
checkpoint's folder/spectrum).
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from linear_eval import DATASETS, load_run

def report(script, z):
    """The covariance eigenvalues of the l2-normalised embedding (float64, largest first, clamped at 1e-12
    where round-off leaves them negative), its effective rank and its collapse metric."""
    z = F.normalize(z.double(), dim=1)
    eigenvalues = torch.linalg.eigvalsh(torch.cov(z.T)).flip(0).clamp_min(1e-12)
    return dict(dim=z.shape[1], eigenvalues=eigenvalues.tolist(), erank=script.effective_rank(z),
                collapse=script.collapse_metric(z).item())

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("checkpoints", nargs="+", help="checkpoint.pt files of the training scripts")
    add("--dataset", choices=DATASETS, help="another dataset (default: each checkpoint's)")
    add("--data-dir", help="where the images are now (default: each checkpoint's --data-dir)")
    add("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda if there is a GPU")
    add("--out", help="path prefix of the outputs (default: beside the first checkpoint)")
    args = parser.parse_args(argv)
    runs = [load_run(path, args.dataset, args.data_dir, 0, args.device) for path in args.checkpoints]
    torch.backends.cudnn.allow_tf32 = False  # TF32 rounds like bf16
    torch.backends.cuda.matmul.allow_tf32 = False
    reports = []
    for path, (script, run_args, checkpoint, model) in zip(args.checkpoints, runs):
        ctx = script.setup(run_args)
        ctx.autocast = torch.autocast(ctx.device.type, enabled=False)
        backbone, projector = script.networks(model.to(ctx.device).eval())
        features = script.embed(backbone, script.load_data(run_args, ctx.device)["test_x"], ctx)
        with torch.no_grad():
            outputs = projector(features)
        label = f"{checkpoint['script']} {Path(path).parent.name} step {checkpoint['step']}"
        entry = dict(checkpoint=path, label=label, num_images=len(features),
                     backbone=report(script, features), projector=report(script, outputs))
        if hasattr(model, "F_hat"):  # a linear predictor: DirectPred's quantities (Tian et al. Sec. 4-5)
            W = model.predictor_matrix() if hasattr(model, "predictor_matrix") else model.predictor.weight
            W = W.double()  # W_p as applied (directpred.py's --symmetric applies the weight's symmetric part)
            keys = ("epoch", "F_eigenvalues", "predictor_eigenvalues", "alignment", "asymmetry")
            history = [{key: row[key] for key in keys} for row in checkpoint["history"] if keys[1] in row]
            entry["predictor"] = dict(script.predictor_statistics(model.F_hat, W), history=history,
                                      sym_min_eigenvalue=torch.linalg.eigvalsh((W + W.T) / 2)[0].item())
        for level in ("backbone", "projector"):
            r = entry[level]
            print(f"{label} | {level} {r['dim']}-d: erank {r['erank']:.2f}, collapse {r['collapse']:.3f}, "
                  f"top eigenvalue {r['eigenvalues'][0]:.3g}", flush=True)
        if "predictor" in entry:
            r = entry["predictor"]
            print(f"{label} | predictor: mean alignment {r['mean_alignment']:.3f}, asymmetry "
                  f"{r['asymmetry']:.3g}, smallest eigenvalue of (W + W^T) / 2 {r['sym_min_eigenvalue']:.3g}")
        reports.append(entry)

    out = Path(args.out or Path(args.checkpoints[0]).parent / "spectrum")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_name(out.name + ".json").write_text(json.dumps(dict(checkpoints=reports)) + "\n")
    fig = Figure(figsize=(13, 4.8), layout="tight")
    for ax, level in zip(fig.subplots(1, 2), ("backbone", "projector")):
        for entry in reports:
            r = entry[level]
            ax.semilogy(range(1, r["dim"] + 1), r["eigenvalues"],
                        label=f"{entry['label']} (erank {r['erank']:.1f}, collapse {r['collapse']:.2f})")
        limit = min(entry["num_images"] for entry in reports) - 1  # the rank of a covariance of n images
        if limit < max(entry[level]["dim"] for entry in reports):
            ax.axvline(limit, color="grey", linestyle=":", label=f"rank limit of {limit + 1} images")
        ax.set(title=f"{level} output", xlabel="index (largest first)", ylabel="eigenvalue",
               ylim=(5e-13, None))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("covariance eigenvalues of the l2-normalised test embeddings")
    fig.savefig(out.with_name(out.name + ".png"), dpi=100)
    with_predictor = [entry for entry in reports if "predictor" in entry]
    if with_predictor:  # a row per checkpoint: over training, then the alignment at the end
        fig = Figure(figsize=(20, 3.8 * len(with_predictor)), layout="tight")
        for row, entry in zip(fig.subplots(len(with_predictor), 5, squeeze=False), with_predictor):
            predictor = entry["predictor"]
            for ax, key in zip(row, ("F_eigenvalues", "predictor_eigenvalues", "alignment", "asymmetry")):
                ax.plot([step["epoch"] for step in predictor["history"]],
                        [step[key] for step in predictor["history"]])
                ax.set(title=f"{entry['label']}\n{key}", xlabel="epoch",
                       yscale="log" if key[0] == "F" else "linear")
            row[4].plot(range(1, len(predictor["alignment"]) + 1), predictor["alignment"], marker=".")
            row[4].set(title=f"alignment at the end; min eigenvalue of (W + W^T) / 2 "
                             f"{predictor['sym_min_eigenvalue']:.3g}", xlabel="eigenvector of F-hat",
                             ylim=(-1.05, 1.05))
        fig.savefig(out.with_name(out.name + "-predictor.png"), dpi=100)
    print(f"wrote {out}.json, {out}.png" + (f", {out}-predictor.png" if with_predictor else ""))
    return dict(checkpoints=reports)

if __name__ == "__main__":
    main()
