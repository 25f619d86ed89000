"""Training code for facewatch's models (YOLOv8 face detector, ConvNeXt-Siamese embedder)."""
