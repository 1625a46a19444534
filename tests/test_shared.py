"""The training scripts stand alone, yet what they share is written once and copied verbatim, so that
`diff byol.py simsiam.py` shows only what the papers change. This test keeps it so."""
import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "byol.py"
METHODS = ["simsiam.py", "dino_vit.py", "directpred.py", "directcopy.py"]
SCRIPTS = [TEMPLATE, *METHODS, "collapse_demo.py"]
OURS = {Path(name).stem for name in [*SCRIPTS, "linear_eval.py", "spectrum.py"]}
BANNER = "# " + "=" * 96 + "\n# Shared plumbing: identical in every training script"
# Above the banner, but the same in every script that has them: the backbone and the training loop.
SAME_ABOVE = ["resnet18_backbone", "train_epoch", "evaluate_and_save"]


def below_banner(script):
    source = (ROOT / script).read_text()
    assert source.count(BANNER) == 1, f"{script} has {source.count(BANNER)} shared-plumbing banners"
    return source[source.index(BANNER):]


def definitions(source):
    """Top-level functions, classes and assignments by name, as source text."""
    tree = ast.parse(source)
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = ast.get_source_segment(source, node)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = ast.get_source_segment(source, node)
    return found


@pytest.mark.parametrize("script", METHODS)
def test_the_shared_plumbing_is_the_templates_verbatim(script):
    assert below_banner(script) == below_banner(TEMPLATE), f"{script} differs from {TEMPLATE} below the banner"


@pytest.mark.parametrize("script", METHODS + ["collapse_demo.py"])
def test_the_backbone_and_training_loop_are_the_templates(script):
    template, copy = definitions((ROOT / TEMPLATE).read_text()), definitions((ROOT / script).read_text())
    differing = [name for name in SAME_ABOVE if name in copy and copy[name] != template[name]]
    assert not differing, f"{script} changes {differing} of {TEMPLATE}"


def test_collapse_demo_carries_the_shared_functions_it_uses_unchanged():
    template, demo = definitions(below_banner(TEMPLATE)), definitions(below_banner("collapse_demo.py"))
    assert len(demo) > 20
    assert not set(demo) - set(template), "collapse_demo.py defines its own functions below the banner"
    assert [name for name in demo if demo[name] != template[name]] == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_recipe_is_the_one_source_of_the_flags_defaults(script):
    """Every RECIPE entry is a flag and is its default; no flag of the recipe has a default elsewhere."""
    module = importlib.import_module(Path(script).stem)
    parser = module.build_parser()
    flags = {action.dest for action in parser._actions}
    assert set(module.RECIPE) <= flags, f"RECIPE entries that are no flag: {set(module.RECIPE) - flags}"
    defaults = vars(parser.parse_args([]))
    assert {name: defaults[name] for name in module.RECIPE} == module.RECIPE
    undefaulted = {name for name, value in defaults.items() if value is None} - {"out_dir", "resume"}
    assert not undefaulted, f"flags without a default: {undefaulted}"
    no_help = [action.dest for action in parser._actions if not action.help]
    assert not no_help, f"flags without help (their default does not show in --help): {no_help}"


@pytest.mark.parametrize("script", [*SCRIPTS, "linear_eval.py", "spectrum.py"])
def test_scripts_import_no_other_file_of_ours(script):
    tree = ast.parse((ROOT / script).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & OURS, f"{script} imports {imported & OURS}"


# One interpreter runs every script as `python <script> --help` (runpy as __main__): torch is imported once.
HELP_ALL = """
import contextlib, io, runpy, sys
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as stop:
        code = stop.code
    else:
        code = "no exit"
    print(path, code, out.getvalue().startswith("usage:") and "(default:" in out.getvalue())
"""


def test_scripts_run_as_commands():
    """Each script's main() runs when it is started as a command, and --help prints its flags with
    their defaults."""
    paths = [str(ROOT / script) for script in [*SCRIPTS, "linear_eval.py", "spectrum.py"]]
    done = subprocess.run([sys.executable, "-c", HELP_ALL, *paths], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:-1] == [f"{path} 0 True" for path in paths]
