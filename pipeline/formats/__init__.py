"""Model file formats: ONNX helpers, and the .pt2 program and AOTInductor package (with
the safe loader)."""
