"""Export Ray Serve's config schema (`ServeDeploySchema`) as JSON for the operator.

The operator must not import ray, yet it validates every serveConfigV2 it renders against Serve's
own schema (KubeRay does not). So the schema is exported
here, committed as `ndif_operator/rendering/serve_schema.json`, and a test (which may import ray)
fails when the installed Ray's schema drifts from the committed file.

    .venv/bin/python tools/export_serve_schema.py          # rewrite the file
    .venv/bin/python tools/export_serve_schema.py --check  # exit 1 on drift
"""

from __future__ import annotations

import argparse
import json
import sys

from ndif_operator.rendering.schema import SCHEMA_PATH


def exported_text() -> str:
    import ray
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_json_schema()
    schema["$comment"] = f"GENERATED from ray {ray.__version__} ServeDeploySchema by tools/export_serve_schema.py"
    return json.dumps(schema, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed schema is stale")
    args = parser.parse_args(argv)
    text = exported_text()
    if args.check:
        if not SCHEMA_PATH.exists() or SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH} is stale: run tools/export_serve_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
