"""The collection stays what it promises: each training script stands alone, what they share is written
once and copied verbatim (so that `diff byol.py simsiam.py` shows only what the papers change), and every
file keeps to its line budget."""
import ast
import importlib
import runpy
import sys
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["simsiam.py", "dino_vit.py", "directpred.py", "directcopy.py"]
TRAINING = ["byol.py", *METHODS, "collapse_demo.py"]
TOOLS = ["linear_eval.py", "spectrum.py"]
BANNER = "# ===== Shared plumbing"
# Ceilings in lines (wc -l): a new feature pays for its lines with lines a reader would not miss.
BUDGETS = {"byol.py": 500, "simsiam.py": 540, "directpred.py": 560, "directcopy.py": 540, "dino_vit.py": 650,
           "collapse_demo.py": 600, "linear_eval.py": 300, "spectrum.py": 320}

def definitions(source):
    """Top-level functions, classes and assignments of a source text, by name, as source text."""
    found = {}
    for node in ast.parse(source).body:
        targets = getattr(node, "targets", [])  # an assignment, a, b = ... included
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
            name.id for target in targets for name in ast.walk(target) if isinstance(name, ast.Name)]
        found.update(dict.fromkeys(names, ast.get_source_segment(source, node)))
    return found

BYOL = (ROOT / "byol.py").read_text()

@pytest.mark.parametrize("script", METHODS)
def test_the_training_loop_and_the_shared_plumbing_are_byols_verbatim(script):
    source = (ROOT / script).read_text()
    assert source.count(BANNER) == 1 and source[source.index(BANNER):] == BYOL[BYOL.index(BANNER):]
    assert definitions(source)["main"] == definitions(BYOL)["main"]
    assert script == "dino_vit.py" or definitions(source)["resnet18"] == definitions(BYOL)["resnet18"]

def test_collapse_demo_carries_the_shared_definitions_it_uses_unchanged():
    demo = (ROOT / "collapse_demo.py").read_text()
    shared, byol = definitions(demo[demo.index(BANNER):]), definitions(BYOL)
    assert {"augment", "load_data", "knn_top1", "effective_rank", "setup", "RANK", "MEAN"} <= shared.keys()
    assert [name for name in shared if shared[name] != byol[name]] == []
    assert definitions(demo)["resnet18"] == byol["resnet18"]

@pytest.mark.parametrize("script", TRAINING)
def test_the_recipe_is_the_one_source_of_the_defaults(script):
    module = importlib.import_module(Path(script).stem)
    parser = module.build_parser()
    defaults = vars(parser.parse_args([]))
    assert set(module.RECIPE) <= {action.dest for action in parser._actions}  # each entry is a flag's
    assert {name: defaults[name] for name in module.RECIPE} == module.RECIPE
    unset = {name for name, value in defaults.items() if value is None}
    assert unset <= {"out_dir", "resume", "img_size", "dtype"}  # each decided when the run starts
    assert all(action.help for action in parser._actions), "a flag without help shows no default in --help"

@pytest.mark.parametrize("script", [*TRAINING, *TOOLS])
def test_training_scripts_import_no_file_of_ours(script):
    imported = {node.module if isinstance(node, ast.ImportFrom) else alias.name
                for node in ast.walk(ast.parse((ROOT / script).read_text()))
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    ours = {Path(name).stem for name in [*TRAINING, *TOOLS]}
    assert not imported & ours if script in TRAINING else imported & ours <= {"linear_eval"}

def test_every_file_keeps_to_its_budget():
    """Line budgets (wc -l, everything counted), at most 110 characters a line, one statement a line."""
    lines = {name: (ROOT / name).read_text().splitlines() for name in BUDGETS}
    over = {name: len(text) for name, text in lines.items() if len(text) > BUDGETS[name]}
    assert not over, f"over budget: {over}"
    assert sum(map(len, lines.values())) <= 4200
    tests = sum(len(path.read_text().splitlines()) for path in (ROOT / "tests").glob("*.py"))
    assert tests <= 1000 and len((ROOT / "README.md").read_text().splitlines()) <= 250
    for path in [*map(ROOT.joinpath, BUDGETS), *(ROOT / "tests").glob("*.py"),
                 *(ROOT / "benchmarks").glob("*.py")]:
        source = path.read_text()
        assert max(map(len, source.splitlines())) <= 110, path.name
        tokens = tokenize.generate_tokens(iter(source.splitlines(keepends=True)).__next__)
        assert not any(token.exact_type == tokenize.SEMI for token in tokens), f"{path.name}: two statements"

@pytest.mark.parametrize("script", [*TRAINING, *TOOLS])
def test_every_script_runs_as_a_command_and_shows_its_defaults(script, monkeypatch, capsys):
    """`python <script> --help`, run as __main__ (runpy) in this process, where torch is loaded already."""
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert stop.value.code == 0 and "(default:" in capsys.readouterr().out
