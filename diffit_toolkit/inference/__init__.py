"""Sampling from a trained model: checkpoint -> model + process -> images (PNG grid, ADM ``.npz``).

* [`pipeline`][diffit_toolkit.inference.pipeline]: [`load_pipeline`][diffit_toolkit.inference.pipeline.load_pipeline]
  reads weights in any format (through [`diffit_toolkit.interop.weights`][diffit_toolkit.interop.weights])
  into a [`Pipeline`][diffit_toolkit.inference.pipeline.Pipeline] that draws images;
* [`writers`][diffit_toolkit.inference.writers]: the ``.npz``, one PNG per image and the sample grid;
* [`export`][diffit_toolkit.inference.export]: a trained model as a folder that samples without its run.

Used by ``diffit-toolkit sample``, ``export`` and ``eval`` and by the trainer for its sample grids.
"""
