"""The README's Python examples run as written."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
FMNIST = "/usr/share/datasets/fashion-mnist"


def _blocks():
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


@pytest.mark.skipif(
    not os.path.isdir(FMNIST) and not os.environ.get("CI"), reason="needs dataset-fashion-mnist"
)
@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_python_block_runs(index):
    exec(compile(_blocks()[index], f"README.md block {index}", "exec"), {})
