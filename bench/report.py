"""One way for bench scripts to hand back a result: printed as JSON and, with a path, written to it."""
from __future__ import annotations

import json
import os


def report(result: dict, out: str | None) -> None:
  print(json.dumps(result, indent=2))
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      json.dump(result, f, indent=2)
