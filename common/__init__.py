"""Small conventions every package shares: image conversion between the project's
tensors ((3, H, W) in [-1, 1]) and uint8 pictures, the PNG writer, and text tables."""
