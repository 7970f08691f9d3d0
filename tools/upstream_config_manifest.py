"""The pinned manifest of XTuner 0.2.0's training configs: names and shapes, no config text.

``python tools/upstream_config_manifest.py GIT_DIR [--ref v0.2.0]`` reads every config under
``xtuner/configs/`` of an XTuner git repository (a bare clone is enough) at the given ref and
rewrites ``tests/configs/xtuner_0_2_0_configs.json``. Each entry holds facts about one config:
its path, its ``framework`` (``mmengine`` or ``huggingface``), the ``(module, name)`` pairs
it imports (``"module:name"``, or ``"module"`` for ``import module``) and the ``type=`` values
it uses, each written as the imported name (or attribute of one,
``AutoTokenizer.from_pretrained``) it stands for, or a quoted registry name (``'ValLoop'``).
A ``type=`` that is a config variable
(``sampler = SequenceParallelSampler if sp > 1 else DefaultSampler``) is followed to the
imported names it can take. ``tests/configs/test_upstream_configs.py`` checks that every name
resolves in this fork and that a config of each shape parses.

A file is a training config when it builds a training loop (``train_cfg``) or trains through
the HF Trainer (``framework = 'huggingface'``); the weight-conversion scripts kept beside the
LLaVA and InternVL configs are neither.
"""

from __future__ import annotations

import argparse
import ast
import json
import os.path as osp
import subprocess

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MANIFEST = osp.join(ROOT, "tests", "configs", "xtuner_0_2_0_configs.json")


def _git(git_dir: str, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", git_dir, *args], check=True, capture_output=True, text=True
    ).stdout


def _assignments(tree: ast.Module) -> dict[str, list[ast.expr]]:
    """Every module-level value bound to each variable name."""
    values: dict[str, list[ast.expr]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    values.setdefault(target.id, []).append(node.value)
    return values


def _imports(tree: ast.Module) -> list[tuple[str, str | None]]:
    pairs = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            pairs += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            pairs += [(alias.name, None) for alias in node.names]
    return pairs


def _resolve(expr: ast.expr, imported: set[str], values: dict, seen: frozenset) -> set[str]:
    """The imported names (or quoted registry names) a ``type=`` expression can stand for."""
    if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
        return {repr(expr.value)}
    if isinstance(expr, ast.IfExp):
        return _resolve(expr.body, imported, values, seen) | _resolve(
            expr.orelse, imported, values, seen
        )
    root = expr
    while isinstance(root, ast.Attribute):
        root = root.value
    if not isinstance(root, ast.Name):
        raise ValueError(f"unexpected type= value {ast.unparse(expr)!r}")
    if root.id in imported:
        return {ast.unparse(expr)}
    if root.id in seen or root.id not in values or not isinstance(expr, ast.Name):
        raise ValueError(f"type= value {ast.unparse(expr)!r} is neither imported nor assigned")
    found: set[str] = set()
    for value in values[root.id]:
        found |= _resolve(value, imported, values, seen | {root.id})
    return found


def shape(source: str) -> dict | None:
    """The facts of one config file, or None when it is not a training config."""
    tree = ast.parse(source)
    values = _assignments(tree)
    framework = "mmengine"
    if "framework" in values:
        framework = ast.literal_eval(values["framework"][-1])
    elif "train_cfg" not in values:
        return None
    imports = _imports(tree)
    imported = {name if name is not None else module.split(".")[0] for module, name in imports}
    types: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg == "type":
                    types |= _resolve(keyword.value, imported, values, frozenset())
    return {
        "framework": framework,
        "imports": sorted({m if n is None else f"{m}:{n}" for m, n in imports}),
        "types": sorted(types),
    }


def build_manifest(git_dir: str, ref: str) -> dict:
    """``configs`` maps each config path (under ``xtuner/configs/``) to a shape id;
    ``shapes`` holds each distinct shape once (95 shapes for 587 configs)."""
    paths = _git(git_dir, "ls-tree", "-r", "--name-only", ref, "xtuner/configs").split()
    configs, shapes, ids = {}, {}, {}
    for path in sorted(paths):
        if not path.endswith(".py") or osp.basename(path) == "__init__.py":
            continue
        facts = shape(_git(git_dir, "show", f"{ref}:{path}"))
        if facts is None:
            continue
        key = json.dumps(facts, sort_keys=True)
        if key not in ids:
            ids[key] = f"shape{len(ids):03d}"
            shapes[ids[key]] = facts
        configs[path.removeprefix("xtuner/configs/")] = ids[key]
    commit = _git(git_dir, "rev-list", "-n1", ref).strip()
    return {
        "source": "InternLM/xtuner",
        "ref": ref,
        "commit": commit,
        "configs": configs,
        "shapes": shapes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("git_dir", help="a git clone of InternLM/xtuner")
    parser.add_argument("--ref", default="v0.2.0")
    parser.add_argument("--out", default=MANIFEST)
    args = parser.parse_args()
    manifest = build_manifest(args.git_dir, args.ref)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"{len(manifest['configs'])} training configs -> {args.out}")


if __name__ == "__main__":
    main()
