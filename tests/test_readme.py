"""The README's usage example runs as written, and .ci/run finds the README's test command."""

import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["out"].shape == (1, 4096, 8, 64)
    assert namespace["logits"].shape == (2, 128, 264)
    assert namespace["text"].shape == (1, 23)


def test_ci_reads_the_test_command():
    script = (ROOT / ".ci" / "run").read_text()
    awk = re.search(r"cmd=\$\(awk '(.*?)' README.md\)", script).group(1)
    cmd = subprocess.run(["awk", awk, str(ROOT / "README.md")], capture_output=True, text=True, check=True).stdout
    assert "pytest" in cmd and "pip install" in cmd and '".[test' in cmd
