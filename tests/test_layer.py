"""The Lambda layer holds the runtime package ``fleet`` and its pinned runtime
dependencies only: no local tool, no development dependency.

Two levels. Always: the layer's source folder (``layers/fleet``) and what its
modules and the handlers import, against the closure of
``layers/fleet/requirements.txt`` as installed in this environment. When a
``sam build`` output exists (``make build``; CI builds before it tests): the built
layer in ``.aws-sam/build/FleetLayer`` itself, package by package and pin by pin.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LAYER = ROOT / "layers" / "fleet"
REQUIREMENTS = LAYER / "requirements.txt"
BUILT = ROOT / ".aws-sam" / "build" / "FleetLayer" / "python"
DEV_ONLY = {"moto", "pytest", "pyyaml", "mypy", "ruff", "hypothesis", "schemathesis", "jsonschema"}


def _pins() -> dict[str, Requirement]:
    lines = [line.split("#", 1)[0].strip() for line in REQUIREMENTS.read_text().splitlines()]
    reqs = [Requirement(line) for line in lines if line]
    return {canonicalize_name(r.name): r for r in reqs}


def _closure(reqs: list[Requirement]) -> set[str]:
    """Every distribution the requirements pull in (as installed here)."""
    seen: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in reqs]
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        for spec in metadata.distribution(name).requires or []:
            sub = Requirement(spec)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((sub, frozenset(sub.extras)))
    return seen


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_layer_folder_holds_the_runtime_package_and_its_requirements_only() -> None:
    # What the repository puts there (an editable install may leave its egg-info).
    tracked = subprocess.run(
        ["git", "ls-files", "layers/fleet"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    top = sorted({Path(p).relative_to("layers/fleet").parts[0] for p in tracked})
    assert top == ["fleet", "mappings", "requirements.txt"]
    # Source mappings ship as data (example files a Client stack can point at), nothing else.
    assert {Path(p).suffix for p in tracked if p.startswith("layers/fleet/mappings/")} == {".json"}
    assert not (LAYER / "fleet_local").exists()
    assert (ROOT / "tools" / "fleet_local" / "cli.py").exists()
    local_tool = {"cli", "local_cli", "demo", "local_runner", "local_api", "local_worker", "localdb", "sam_template"}
    assert not {p.stem for p in (LAYER / "fleet").rglob("*.py")} & (local_tool | {"status"})


def test_botocore_is_pinned_with_boto3_deliberately() -> None:
    pins = _pins()
    # aws-xray-sdk pulls botocore into the layer; it is pinned with its boto3.
    assert "botocore" in _closure([pins["aws-lambda-powertools"]])
    for name in ("boto3", "botocore"):
        (spec,) = pins[name].specifier
        assert spec.operator == "==", name
        assert metadata.version(name) == spec.version, f"the environment's {name} is not the layer's"
    assert "boto3/botocore are bundled, deliberately" in REQUIREMENTS.read_text()


@pytest.mark.parametrize("folder", ["layers/fleet/fleet", "functions/ingest", "functions/push", "functions/bootstrap"])
def test_what_runs_in_lambda_imports_only_the_stdlib_fleet_and_the_layers_requirements(folder: str) -> None:
    allowed_dists = _closure(list(_pins().values()))
    providers = metadata.packages_distributions()
    own = {p.stem for p in (ROOT / folder).glob("*.py")}
    problems = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in sorted(_imports(path)):
            if name in sys.stdlib_module_names or name == "fleet" or name in own:
                continue
            dists = {canonicalize_name(d) for d in providers.get(name, [])}
            if not dists & allowed_dists:
                problems.append(f"{path.relative_to(ROOT)} imports {name} ({', '.join(sorted(dists)) or 'unknown'})")
    assert not problems, "not in the layer: " + "; ".join(problems)


def _built_distributions() -> dict[str, str]:
    out = {}
    for info in BUILT.glob("*.dist-info"):
        meta = metadata.Distribution.at(info).metadata
        out[canonicalize_name(meta["Name"])] = meta["Version"]
    return out


@pytest.fixture
def built_layer() -> Path:
    if not BUILT.is_dir():
        pytest.skip(
            "no sam build output in .aws-sam/build/FleetLayer: run `make build` (CI does before the tests);"
            " only the layer's source and requirements were checked"
        )
    return BUILT


def test_the_built_layer_holds_fleet_and_the_pinned_closure_only(built_layer: Path) -> None:
    assert (built_layer / "fleet" / "__init__.py").exists()
    built_modules = {str(p.relative_to(built_layer)) for p in (built_layer / "fleet").rglob("*.py")}
    source_modules = {str(p.relative_to(LAYER)) for p in (LAYER / "fleet").rglob("*.py")}
    assert built_modules == source_modules, "the built layer is not the source's package (run make build again)"
    assert not (built_layer / "fleet_local").exists()
    built = _built_distributions()
    pins = _pins()
    assert set(built) == _closure(list(pins.values())), "the built layer's packages are not the requirements' closure"
    assert not set(built) & DEV_ONLY
    for name, req in pins.items():
        assert req.specifier.contains(built[name]), f"{name} {built[name]} in the layer, pinned {req.specifier}"
