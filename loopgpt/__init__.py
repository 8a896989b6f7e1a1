"""loopgpt: a serving stack for loop-residual GPT models (train, serve, export, load-test).

    loopgpt --help
    loopgpt --version
"""

from pathlib import Path

__version__ = "0.1.0"  # the distribution's version too (pyproject.toml reads it from here)
DISTRIBUTION = "loopgpt-serve"  # its name on a package index; `loopgpt` there is an unrelated project

_DEMO = Path(__file__).resolve().parent.parent / "checkpoints" / "demo"


def demo_checkpoint() -> str:
    """The shipped demo checkpoint beside the source tree (a clone, an editable install), else ./checkpoints/demo
    (the Docker image's working directory)."""
    return str(_DEMO if _DEMO.is_dir() else Path("checkpoints/demo"))


def install_hint(extra: str) -> str:
    """The command that installs an optional extra, as it works from a clone of the repository."""
    return f'pip install -e ".[{extra}]"'
