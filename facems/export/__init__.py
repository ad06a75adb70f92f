"""Model export: ONNX files for onnxruntime and insightface (:mod:`facems.export.onnx`)."""
