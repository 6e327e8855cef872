"""The privacy-section template ships in a NON-editable wheel (``hf_ewtune/model_cards`` is a symlink to
the top-level ``model_cards/``) and is found there through ``importlib.resources``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_contains_template_and_card_command(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "model_cards", src / "model_cards", ignore=shutil.ignore_patterns("example"))
    # symlinks=True keeps hf_ewtune/model_cards a symlink, as in the repository.
    shutil.copytree(ROOT / "hf_ewtune", src / "hf_ewtune", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    assert (src / "hf_ewtune" / "model_cards").is_symlink()
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
         str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("hf_ewtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "hf_ewtune/model_cards/privacy_section.md" in names
    assert "hf_ewtune/model_card.py" in names and "hf_ewtune/commands/card.py" in names
    assert not any(n.startswith("hf_ewtune/model_cards/example") for n in names)

    # Import the unpacked wheel (not the repository) and render the template from package data.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import hf_ewtune.model_card as m, pathlib; "
        f"assert pathlib.Path(m.__file__).is_relative_to({str(site)!r}), m.__file__; "
        "t = m._template().template; assert '## Privacy' in t and '$epsilon' in t; print('ok')"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
