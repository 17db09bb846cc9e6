"""Every example runs: the scripts in examples/ and the ```python blocks of README.md and docs/*.md.

Each runs in a fresh interpreter in a temporary folder. The MiniLM examples run on the model's first layer
(LOWBIT_EXAMPLES_SMALL=1, a switch the scripts show); the Markdown blocks of one file run in order as one
script, as a reader would paste them."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXPECT = {  # a line each example must print: it got to the end and measured something
    "compile_causal_lm.py": "w2-quip:",
    "export_executorch.py": "cosine of token states to float:",
    "export_onnx.py": "cosine of token states to float:",
    "mixed_precision.py": "plot: example-out/minilm-2.5bpw.png",
}

pytestmark = pytest.mark.drift  # in the drift subset (.ci/run): newest allowed releases


def _run(args, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "LOWBIT_EXAMPLES_SMALL": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_script_runs(script, tmp_path):
    r = _run([str(script)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert EXPECT[script.name] in r.stdout, r.stdout[-2000:]


def python_blocks(md: Path) -> str:
    return "\n".join(re.findall(r"```python\n(.*?)```", md.read_text(), flags=re.S))


@pytest.mark.parametrize("md", [d for d in DOCS if python_blocks(d)], ids=lambda p: p.name)
def test_markdown_python_blocks_run(md, tmp_path):
    code = python_blocks(md)
    (tmp_path / "snippet.py").write_text(code)
    r = _run(["snippet.py"], tmp_path)
    assert r.returncode == 0, f"{md.name}:\n{code}\n{r.stderr[-3000:]}"


def test_every_example_has_an_expected_line():
    assert {p.name for p in EXAMPLES} == set(EXPECT)


def test_every_test_the_docs_name_exists():
    """docs/reliability.md is an index of where each case is tested (`file::test`, R:: = test_reliability.py,
    F:: = test_fuzz.py): a renamed or moved test must not leave the index pointing nowhere."""
    import glob
    import os
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = {os.path.relpath(p, os.path.join(root, "tests")): open(p).read()
               for p in glob.glob(os.path.join(root, "tests", "**", "test_*.py"), recursive=True)}
    short = {"R": "test_reliability.py", "F": "test_fuzz.py"}
    missing, named = [], 0
    for md in [*glob.glob(os.path.join(root, "docs", "*.md")), os.path.join(root, "README.md")]:
        text = open(md).read()
        refs = [(f, t) for f, t in re.findall(r"([A-Za-z_/]*test_[a-z0-9_]+\.py)::(test_[a-z0-9_]+)", text)]
        refs += [(short[k], t) for k, t in re.findall(r"\b([RF])::(test_[a-z0-9_]+)", text)]
        for f, t in refs:
            named += 1
            files = [s for p, s in sources.items() if p == f or p.endswith("/" + f) or os.path.basename(p) == f]
            if not any(re.search(rf"def {t}\b", s) for s in files):
                missing.append(f"{os.path.basename(md)}: {f}::{t}")
    assert named > 50 and missing == [], missing
