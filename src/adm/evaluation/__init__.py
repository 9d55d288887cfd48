"""The paper's evaluation: FID, sFID, Inception Score, precision and recall.

- `inception`: PyTorch port of the 2015 Inception graph with the TF1 resize
- `batches`: reading sample and reference batches (.npz) and feature caches
- `metrics`: Fréchet distance, Inception Score, improved precision/recall
- `evaluate`: `adm eval`/`adm stats`: features, statistics and the metric report
- `judge`: a clean-image classifier as the Inception stand-in of small experiments (demo, sweep)
"""
