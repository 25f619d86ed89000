"""Exporters: trained checkpoints to ONNX files with embedded metadata."""
