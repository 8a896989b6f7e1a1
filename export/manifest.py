"""What an export directory holds: the graph file names, the manifest's format tag, and the check that a
directory is one. The exporter writes this layout, the runner and the parity check read it; this module
imports neither, so the three depend on it and not on each other (onnx_export -> parity -> runtime -> here).

    python -c "from loopgpt.export.manifest import read_manifest; print(read_manifest('exports/demo')['graphs'])"
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "loopgpt-onnx/1"
SPLIT = ("embed.onnx", "loop_body.onnx", "head.onnx")
SINGLE = "model.onnx"


class ExportError(ValueError):
    """The export cannot be written, read, or does not match PyTorch; the message says which and why."""


def read_manifest(export_dir: str | Path) -> dict:
    path = Path(export_dir) / MANIFEST
    if not Path(export_dir).is_dir():
        raise ExportError(f"{export_dir}: export directory does not exist; run `loopgpt export onnx` first")
    if not path.is_file():
        raise ExportError(f"{path}: manifest is missing; is this a `loopgpt export onnx` directory?")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: not a {FORMAT} manifest; re-export with this version of loopgpt")
    for name in SPLIT:
        if not (Path(export_dir) / name).is_file():
            raise ExportError(f"{Path(export_dir) / name}: graph file is missing; re-run the export")
    return manifest
