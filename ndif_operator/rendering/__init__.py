"""Pure rendering: a `Plan` and the ModelDeployments → Ray Serve config (`serveConfigV2`).

    config = render_serve_config(plan, deployments, options=RenderOptions(cpu_only=True))
    check_serve_config(config)         # against Ray Serve's committed schema; raises ServeConfigInvalid
    text = serve_config_text(config)   # byte-stable: same plan, same bytes

No I/O and no ray import: the operator and the local mode both call this.
"""

from ndif_operator.rendering.options import RenderOptions
from ndif_operator.rendering.schema import ServeConfigInvalid, check_serve_config, validate_serve_config
from ndif_operator.rendering.serve_config import ServeConfig, render_serve_config
from ndif_operator.rendering.text import canonical_number, canonicalize, serve_config_text

__all__ = [
    "RenderOptions",
    "ServeConfig",
    "ServeConfigInvalid",
    "canonical_number",
    "canonicalize",
    "check_serve_config",
    "render_serve_config",
    "serve_config_text",
    "validate_serve_config",
]
