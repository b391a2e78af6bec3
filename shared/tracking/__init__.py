"""A thin MLflow layer every training job uses: one run, explicit tracking URI, metrics that survive outages.

Why not the fluent ``mlflow.*`` API: it keeps one global active run and one global tracking URI, so two
trackers (a training job and its evaluation, or tests against two servers) would step on each other.
``MlflowClient`` takes both explicitly. ``client`` holds the retrying call layer, ``tracker`` the run
(``Tracker``), ``registry`` the model registry.
"""
from shared.tracking.client import STANDARD_TAGS, find_run_by_tag, flatten_params, get_or_create_experiment, git_commit
from shared.tracking.registry import register_model
from shared.tracking.tracker import Tracker

__all__ = ["STANDARD_TAGS", "Tracker", "find_run_by_tag", "flatten_params", "get_or_create_experiment", "git_commit",
           "register_model"]
