"""The committed OpenAPI document (docs/specs/openapi.json).

``python -m ember.api.openapi`` (``make openapi``) rewrites it; a test fails when stale.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ember.api.app import create_app


def document() -> dict[str, Any]:
    return create_app(None).openapi()


def render() -> str:
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/specs/openapi.json")
    out.write_text(render())
    sys.stdout.write(f"wrote {out}\n")


if __name__ == "__main__":
    main()
