"""The paper's evaluation: FID, sFID, Inception Score, precision and recall; KID, FD-DINOv2.

- `inception`: PyTorch port of the 2015 Inception graph with the TF1 resize
- `dinov2`: DINOv2 ViT-L/14 in plain PyTorch (official state dict, strict) for FD-DINOv2
- `weights`: where weights files are looked for (adm, torch hub), SHA-256, the download
- `batches`: reading sample and reference batches (.npz), image folders and globs
- `inputs`: what each side of `adm eval` is (images and/or statistics), what each metric needs
- `features`: features of a source through Inception or DINOv2, batched and cached
- `metrics`: Fréchet distance, Inception Score (and std), improved precision/recall, KID
- `evaluate`: `adm eval`/`adm stats`: the chosen metrics of two inputs, reference batches
- `judge`: a clean-image classifier as the Inception stand-in of small experiments (demo, sweep)
- `edits`: scores of inpainted images: the regenerated region's error and the seam
"""
