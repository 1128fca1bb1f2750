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
