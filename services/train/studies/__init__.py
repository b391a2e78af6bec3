"""Studies: one spec fans out into training runs (``spec``), run by a controller per study (``manager``,
``search`` for Optuna), and comes back as the filled comparison table, plots and report (``report``)."""
