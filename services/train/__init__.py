"""Training: the config schema, the engine, checkpoints/resume, model export and the worker entrypoint.

The TrainService launches ``python -m services.train.worker`` (or it under torchrun for data-parallel runs);
everything a run produces goes to the artifact store, MLflow and the per-run events file.
"""
