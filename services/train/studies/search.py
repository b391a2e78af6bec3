"""A study's search: Optuna (TPE or random sampling, a median pruner) over continuous config fields, one
Optuna study per grid point, kept in a journal file so a restarted train service carries on where it was.

Trials are asked as slots free up, so TPE sees the finished ones; a running trial reports its objective
after every epoch (from the run's events) and is stopped when the median pruner says so.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import optuna

from services.train.runs import RunView
from services.train.studies.spec import Trial, grid_points, trial_config, trial_for, with_links

if TYPE_CHECKING:
    from services.train.studies.manager import StudyRecord

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _point_key(point: dict) -> str:
    return json.dumps(point, sort_keys=True)


class Search:
    def __init__(self, record: StudyRecord, directory: Path):
        spec = record.spec
        search = spec.search
        directory.mkdir(parents=True, exist_ok=True)
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        self.storage = JournalStorage(JournalFileBackend(str(directory / "optuna.journal")))
        self.spec = spec
        self.distributions = {
            name: (optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log) if p.type == "int"
                   else optuna.distributions.FloatDistribution(p.low, p.high, log=p.log))
            for name, p in search.params.items()}
        self.points = {_point_key(p): p for p in grid_points(spec)}
        self.studies: dict[str, optuna.Study] = {}
        existing = set(optuna.study.get_all_study_names(self.storage))
        for key in self.points:
            name = f"{record.study_id}:{key}"
            # A sampler seeded as at the start would ask a restarted search for the values it asked first (the
            # same overrides: the same trial ids); seeded past the trials asked so far, it asks new ones.
            asked = len(optuna.load_study(study_name=name, storage=self.storage).trials) if name in existing else 0
            sampler = optuna.samplers.TPESampler(seed=search.seed + asked) if search.sampler == "tpe" \
                else optuna.samplers.RandomSampler(seed=search.seed + asked)
            pruner = optuna.pruners.MedianPruner(n_startup_trials=search.pruner_startup_trials,
                                                 n_warmup_steps=search.pruner_warmup_epochs) \
                if search.pruner == "median" else optuna.pruners.NopPruner()
            self.studies[key] = optuna.create_study(
                study_name=name, storage=self.storage, sampler=sampler, pruner=pruner,
                direction=spec.objective.direction, load_if_exists=True)
        self._live: dict[str, optuna.Trial] = {}

    def _trial(self, trial: Trial) -> optuna.Trial:
        """The Optuna trial behind one of ours (rebuilt after a restart from the journal)."""
        live = self._live.get(trial.trial_id)
        if live is None:
            study = self.studies[trial.search_point]
            # A Study hides its storage and id; the storage's own (public) API maps the trial number back.
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(
                self.storage.get_study_id_from_name(study.study_name), trial.number)
            live = self._live[trial.trial_id] = optuna.Trial(study, trial_id)
        return live

    def new_trials(self, record: StudyRecord, running: int, slots: int) -> list[Trial]:
        out = []
        for key, study in self.studies.items():
            asked = sum(1 for t in [*record.trials, *out] if t.search_point == key)
            while slots > 0 and asked < self.spec.search.trials:
                ot = study.ask(self.distributions)
                point = self.points[key]
                overrides = {**with_links(self.spec, point), **ot.params}
                trial = trial_for(self.spec, record.study_id, overrides, point, key, ot.number)
                trial_config(self.spec, trial)  # a sampled value the config refuses fails here, loudly
                self._live[trial.trial_id] = ot
                out.append(trial)
                asked, slots = asked + 1, slots - 1
        return out

    def report(self, record: StudyRecord, views: dict[str, RunView], prune: Callable[[Trial, str], None]) -> None:
        """Feed the running trials' per-epoch objective to Optuna and settle the ended ones."""
        metric = self.spec.objective.metric
        for trial in record.trials:
            outcome = record.outcome(trial.trial_id)
            if not trial.search_point or outcome.state == "QUEUED":
                continue
            study = self.studies[trial.search_point]
            told = study.get_trials(deepcopy=False)[trial.number]
            if told.state != optuna.trial.TrialState.RUNNING:
                continue  # told already
            if outcome.state in ("FAILED", "CANCELLED"):
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
                continue
            view = views.get(trial.trial_id)
            if view is None:
                continue
            # Every epoch Optuna has not seen, also of a trial that ended between two polls: the median pruner
            # compares a running trial with the completed trials' values at the same epoch.
            ot = self._trial(trial)
            values = [(int(ev["epoch"]), float(ev["metrics"][metric])) for ev in view.epoch_events
                      if metric in ev.get("metrics", {})]
            for epoch, value in values:
                if epoch not in told.intermediate_values:
                    ot.report(value, epoch)
            if outcome.state == "RUNNING":
                if values and ot.should_prune():
                    prune(trial, f"at epoch {view.epoch}: {metric} below the median of earlier trials")
                    study.tell(trial.number, state=optuna.trial.TrialState.PRUNED)
            elif outcome.state == "SUCCEEDED":
                best = max if self.spec.objective.direction == "maximize" else min
                study.tell(trial.number, best(v for _, v in values))

    def exhausted(self, record: StudyRecord) -> bool:
        """Every grid point has asked for all its trials."""
        return all(sum(1 for t in record.trials if t.search_point == key) >= self.spec.search.trials
                   for key in self.studies)
