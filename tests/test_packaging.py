"""The project works as a built wheel, not only as an editable install; what ships is what runs
in production (benchmarks, evaluations, test receivers, fixtures and synthetic streams live in
bench/ and tests/support/, and no production module imports them)."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION_FOLDERS = ("agentwatch", "collectors", "streams", "detectors", "alerts", "dashboards")
# Modules that moved out of the package into bench/ and tests/support/, by their old names.
MOVED_MODULES = ("agentwatch.bench", "agentwatch.bench_faults", "agentwatch.bench_floor",
                 "agentwatch.drift_quality", "agentwatch.alerts.bench_alerts", "agentwatch.alerts.testing",
                 "agentwatch.dashboards.bench_metrics", "agentwatch.dashboards.metrics_fixture",
                 "agentwatch.detectors.bench_state", "agentwatch.detectors.synthetic")
# Benchmark functions that moved out of production modules.
MOVED_NAMES = {"agentwatch.streams.partition_checkpoint": "bench_checkpoint", "agentwatch.streams.drift_sampler": "bench_drift",
               "agentwatch.collectors.gpu_sim": "bench_vram"}


def _imports(path: Path) -> list[tuple[int, str, tuple[str, ...]]]:
    """(line, absolute module, names imported from it) of every import in ``path``, nested ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against the module's package in the wheel
                package = "agentwatch" if path.parent.name == "agentwatch" else f"agentwatch.{path.parent.name}"
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{module}" if module else base
            found.append((node.lineno, module, tuple(alias.name for alias in node.names)))
    return found


def test_no_production_module_imports_bench_tests_or_moved_modules():
    offending = []
    sources = [p for folder in PRODUCTION_FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(sources) > 30
    for path in sources:
        for line, module, names in _imports(path):
            top = module.split(".")[0]
            moved = [m for m in MOVED_MODULES if module == m or module.startswith(m + ".")
                     or any(f"{module}.{n}" == m for n in names)]
            if top in ("bench", "tests") or moved or MOVED_NAMES.get(module) in names:
                offending.append(f"{path.relative_to(ROOT)}:{line}: {module} {', '.join(names)}".rstrip())
        offending += [f"{path.relative_to(ROOT)}:{node.lineno}: defines {node.name}"
                      for node in ast.walk(ast.parse(path.read_text()))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("bench_")]
    assert not offending, "production code imports (or defines) benchmark/test code:\n" + "\n".join(offending)


@pytest.mark.slow
def test_built_wheel_maps_the_top_level_folders_and_imports(tmp_path):
    # sdist, then the wheel from the unpacked sdist (the release path): a wheel built in the
    # checkout would also pack whatever a past build left in build/lib, moved modules included.
    subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--skip-dependency-check",
                    "--outdir", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("agentwatch-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("agentwatch/cli.py", "agentwatch/streams/normalize.py", "agentwatch/streams/pricing.json",
                   "agentwatch/detectors/base.py", "agentwatch/alerts/policy.py",
                   "agentwatch/collectors/rotel.py", "agentwatch/dashboards/metrics.py"):
        assert module in names, f"{module} missing from the wheel"
    assert not any(n.startswith(("streams/", "detectors/", "tests/")) for n in names), "generic top-level packages leaked"
    code = [n for n in names if n.endswith(".py")]
    leaked = [n for n in code if n.startswith(("bench/", "tests/", "agentwatch/bench", "agentwatch/tests"))
              or "/support/" in n or Path(n).name.startswith("bench")
              or Path(n).name in ("testing.py", "metrics_fixture.py", "synthetic.py", "drift_quality.py",
                                  "receivers.py")]
    assert not leaked, f"benchmark, test or fixture modules in the wheel: {leaked}"
    assert not any("bench_" in n or "drift_quality" in n for n in names), "benchmark files in the wheel"
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(metadata).decode()

    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    probe = ("import agentwatch.streams.normalize as n, agentwatch.streams.pricing as p, agentwatch.cli;"
             "print(n.__file__); print(p.PricingTable.load().price('gpt-4o').input)")
    # PYTHONPATH comes before the editable install's finder, so this imports the wheel's files.
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(unpacked), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    module_file, price = result.stdout.split()
    assert module_file.startswith(str(unpacked))
    assert float(price) == 2.5

    # Benchmarks run from a checkout only: from the wheel alone, one clear line and a failure.
    bench = subprocess.run([sys.executable, "-m", "agentwatch", "bench", "--section", "metrics_overhead"],
                           capture_output=True, text=True, env={"PYTHONPATH": str(unpacked), "PATH": "/usr/bin:/bin"},
                           cwd=tmp_path)
    assert bench.returncode == 1
    assert bench.stderr.strip().count("\n") == 0 and "source checkout" in bench.stderr, bench.stderr
