"""Images in: image folders, .npz batches, IDX files, crops, the training dataset and loader.

- `datasets`: image sources, the original's crops, the training dataset, batch plan and loader
- `images`: any Pillow image to 8-bit grey or RGB, 16-bit and float pixels scaled, not clipped
- `fashion_mnist`: finding (or downloading, checked) Fashion-MNIST for the demo
"""
