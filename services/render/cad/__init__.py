"""DeepCAD rendering: parse cad_json, rebuild solids with manifold3d, rasterise 3 orthographic views.

Public entry points: ``render_cad`` (one model -> PNG bytes per view), ``CadRenderJob`` and
``CadSynthJob`` (sharded jobs for services.render.shards.run_sharded), ``generate_cad_json``
(a random valid model) and ``parse_cad`` / ``rebuild`` for the pieces.
"""
from shared.cad.deepcad import CadFormatError, CadModel, load_cad_json, parse_cad

from .geometry import mesh_arrays, rebuild
from .jobs import CadRenderJob, CadSynthJob, failure_reason, image_name, render_cad, render_directory
from .raster import VIEW_NAMES, encode_png, render_views
from .synth import generate_cad_json, item_seed

__all__ = [
    "CadFormatError",
    "CadModel",
    "CadRenderJob",
    "CadSynthJob",
    "VIEW_NAMES",
    "encode_png",
    "failure_reason",
    "generate_cad_json",
    "image_name",
    "item_seed",
    "load_cad_json",
    "mesh_arrays",
    "parse_cad",
    "rebuild",
    "render_cad",
    "render_directory",
    "render_views",
]
