"""Applying a trained model to new images: predictors, :func:`paws.load`, the export formats
(safetensors + JSON, ONNX) and the files predictions and embeddings are written to."""
