"""The DeepCAD ``cad_json`` format, shared by the render service (rebuild, rasterise) and the convert
service (describe in words)."""
