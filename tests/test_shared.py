"""The training scripts stand alone, yet their shared parts are written once and copied verbatim,
so that `diff byol.py simsiam.py` shows only what the papers change. This test keeps it so."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "byol.py"
SCRIPTS = ["simsiam.py", "dino_vit.py", "directpred.py", "directcopy.py", "collapse_demo.py"]
OURS = {Path(name).stem for name in [TEMPLATE, *SCRIPTS, "linear_eval.py", "spectrum.py"]}
# Functions of byol.py that every script defining them must carry unchanged.
SHARED = ["fail", "resume_args", "load_dataset", "resize_uint8", "read_image_folder", "synthetic_dataset",
          "sample_view_params", "sample_crop_boxes", "crop_flip_resize", "rgb_to_grayscale", "blend",
          "adjust_hue", "color_jitter", "apply_view", "cifar_resnet18", "cosine_schedule", "collapse_metric",
          "effective_rank", "embed", "knn_top1", "save_checkpoint", "load_checkpoint", "write_metrics",
          "pick_device", "prepare_data", "stop_if_not_finite", "rng_state", "set_rng_state", "format_seconds"]


def functions(path):
    source = path.read_text()
    tree = ast.parse(source)
    return {node.name: ast.get_source_segment(source, node) for node in tree.body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_shared_functions_are_verbatim_copies_of_the_template(script):
    template, copy = functions(ROOT / TEMPLATE), functions(ROOT / script)
    differing = [name for name in SHARED if name in copy and copy[name] != template[name]]
    assert not differing, f"{script} changes shared functions of {TEMPLATE}: {differing}"


@pytest.mark.parametrize("script", [TEMPLATE, *SCRIPTS, "linear_eval.py", "spectrum.py"])
def test_scripts_import_no_other_file_of_ours(script):
    tree = ast.parse((ROOT / script).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & OURS, f"{script} imports {imported & OURS}"
