"""Training diffusion models, classifiers and upsamplers (torchrun, AMP, EMA, resume).

- `loop`: the training loop, evaluation of held-out images, sample grids
- `step`: one optimisation step: micro-batches, AMP, timestep sampling, EMA
- `setup`: typed training config, data and run-folder setup
- `state`: training state: EMA, atomic checkpoints, exact resume
- `lr`: the LR schedule (constant or linear anneal) and what a resume with new flags does to it
- `log`: CSV/TensorBoard logs, loss curves, grids
"""
