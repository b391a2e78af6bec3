"""Benchmarking: params, FLOPs/MACs, latency, throughput, peak memory and int8 size of any registered model.

Each model is measured in its own fresh subprocess (``measure``) so that peak memory and thread settings are
the model's own; ``runner`` spawns those subprocesses, logs one MLflow run per model and writes the tables
(``report``).
"""
