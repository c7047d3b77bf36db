"""The serving runtime: the model repository (declared and built versions) and the loaded models (hot swap, draining, pins). Never imports build-time tools."""
