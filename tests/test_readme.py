"""The README's Python block runs as it is, so its calls and shapes stay true."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_python_block_runs(capsys):
    text = README.read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    exec(compile(block, "README.md (## Python)", "exec"), {})
    assert "'AP_inf': 100.0" in capsys.readouterr().out


def test_an_installed_wheel_finds_its_presets(tmp_path):
    """A regular (not editable) install: the wheel carries configs/*.yaml, and presets load from where it installed."""
    import shutil
    import subprocess
    import sys

    import pytest

    pytest.importorskip("pip")  # a venv made without it (uv) cannot build here
    root = README.parent
    src = tmp_path / "src"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info", ".whl",
                                                             "__pycache__", "data", "viz"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "wheel"), str(src)],
                   check=True)  # as `pip install .` builds it (the build backend from the package index)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True)
    probe = ("from world_model.config import PRESET_DIR, PretrainConfig, load_config; "
             "print(PRESET_DIR.relative_to(PRESET_DIR.parents[1]), load_config(PretrainConfig, 'clevr_tiny').task)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site")},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["world_model/presets", "setpred"]  # inside the package: no top-level `configs` to clash
    assert not (tmp_path / "site" / "configs").exists()
