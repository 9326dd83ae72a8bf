"""The project works as a built wheel, not only as an editable install."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_built_wheel_maps_the_top_level_folders_and_imports(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("agentwatch-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("agentwatch/cli.py", "agentwatch/streams/normalize.py", "agentwatch/streams/pricing.json",
                   "agentwatch/detectors/base.py", "agentwatch/alerts/policy.py",
                   "agentwatch/collectors/rotel.py", "agentwatch/dashboards/metrics.py"):
        assert module in names, f"{module} missing from the wheel"
    assert not any(n.startswith(("streams/", "detectors/", "tests/")) for n in names), "generic top-level packages leaked"
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
