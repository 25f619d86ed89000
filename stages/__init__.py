"""The daemon's stages and the runtime pieces they share (detector, embedder, crop, gallery)."""
