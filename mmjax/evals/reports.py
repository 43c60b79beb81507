"""Evaluator reports on disk."""

import json
import os

from mmjax import files


def write_json(directory: str, name: str, step: int, report) -> list[str]:
  """Writes `report` (JSON-serialisable) to `<directory>/<name>_report_<step>.json`; returns
  `[path]`, as an evaluator's `write_report` does."""
  path = os.path.join(directory, f'{name}_report_{step}.json')
  with files.atomic_write(path) as f:
    json.dump(report, f, indent=1)
  return [path]
