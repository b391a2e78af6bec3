"""Measuring models: params, FLOPs (timm's convention), latency, throughput, peak memory and int8 figures.

Used by the benchmark service and by the train service's study trials, so both report the same numbers.
"""
