"""Model rollout: a new bundle is scored in shadow beside the current one before it takes over.

A bundle that verified can still be wrong for this site: trained on other machines, mis-scaled,
alarming on everything. So the service does not swap it in at once ([model] shadow_windows > 0): the
shadow gets every reading the pipeline accepts, windows and scores them with its own windower,
scorer and thresholder, stores its scores beside the current model's (the `scores` table keeps the
model id), and compares its verdicts with the current model's on the same windows. It never alerts.
After `shadow_windows` windows it is promoted if it agreed on at least `min_agreement` of the compared
windows; a scoring error (or a non-finite score) ends the shadow at once and the current model goes
on. After a promotion the previous model is kept for as many windows again: an error of the new one
in that time rolls back to it (agent/service.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

from agent import metrics
from agent.buffer import Buffer
from agent.bundle import MANIFEST_NAME, MANIFEST_SHA_NAME, Bundle, BundleError, load_bundle
from agent.score import Scorer
from agent.threshold import Thresholder
from agent.types import Judgement, Reading
from agent.window import Windower

log = logging.getLogger(__name__)

_MAIN_MEMORY = 4096  # main-model verdicts kept for matching (device, window end) -> anomalous


class Shadow:
    """A candidate model scoring beside the current one. Runs in the pipeline's thread."""

    def __init__(
        self,
        bundle: Bundle,
        stages: tuple[Scorer, Windower, Thresholder],
        needed: int,
        buffer: Buffer,
    ) -> None:
        self.bundle = bundle
        self.scorer, self.windower, self.thresholder = stages
        self.needed = needed
        self.buffer = buffer
        self.windows = 0
        self.anomalous = 0
        self.compared = 0
        self.agreed = 0
        self.main_anomalous = 0
        self.error: str | None = None
        self._main: OrderedDict[tuple[str, float], bool] = OrderedDict()

    @property
    def model_id(self) -> str:
        return self.bundle.model_id

    @property
    def done(self) -> bool:
        """Enough windows scored (or an error): the service decides now."""
        return self.error is not None or self.windows >= self.needed

    @property
    def agreement(self) -> float:
        """Share of windows scored by both models on which their verdicts agree (NaN: none compared)."""
        return self.agreed / self.compared if self.compared else math.nan

    def note_main(self, judgements: list[Judgement]) -> None:
        """The current model's verdicts, to compare the shadow's with."""
        for j in judgements:
            self._main[(j.score.device, round(j.score.end_ts, 3))] = j.anomalous
        while len(self._main) > _MAIN_MEMORY:
            self._main.popitem(last=False)

    def push(self, reading: Reading) -> None:
        """One accepted reading; scores the shadow's windows that it completes."""
        if self.error is not None:
            return
        try:
            windows = self.windower.push(reading)
            if not windows:
                return
            scores = self.scorer.score(windows)
        except Exception as exc:  # any failure of the candidate ends its shadow, never the pipeline
            self._fail(f"{type(exc).__name__}: {exc}")
            return
        bad = [s for s in scores if not math.isfinite(s.error)]
        if bad:
            self._fail(f"non-finite score {bad[0].error} for {bad[0].device} at {bad[0].end_ts}")
            return
        judgements = []
        for score in scores:
            judgement = self.thresholder.classify(score)
            self.thresholder.learn_one(judgement)
            judgements.append(judgement)
            self.windows += 1
            self.anomalous += int(judgement.anomalous)
            main = self._main.get((score.device, round(score.end_ts, 3)))
            if main is not None:
                self.compared += 1
                self.agreed += int(main == judgement.anomalous)
                self.main_anomalous += int(main)
        self.buffer.add_judgements(judgements)  # both models' scores are kept, told apart by model_id
        metrics.SHADOW_WINDOWS.set(self.windows)
        metrics.SHADOW_AGREEMENT.set(self.agreement)

    def _fail(self, why: str) -> None:
        self.error = why
        log.error("shadow model %s failed, it will not be promoted: %s", self.model_id, why)

    def report(self) -> dict[str, Any]:
        """What the status message and the log say about the rollout."""

        def share(n: int, d: int) -> float | None:
            return round(n / d, 4) if d else None

        return {
            "shadow_model_id": self.model_id,
            "windows": self.windows,
            "needed": self.needed,
            "compared": self.compared,
            "agreement": share(self.agreed, self.compared),
            "shadow_anomalous_share": share(self.anomalous, self.windows),
            "current_anomalous_share": share(self.main_anomalous, self.compared),
            "error": self.error,
        }


class ModelStore:
    """Copies of the bundles the agent scores with, in its state directory (`<state_dir>/models`).

    A new bundle replaces the files in `[model] path`, so without a copy a restart during a rollout
    would come back with the candidate and skip its shadow, and a rollback would have no files to go
    back to. `active.json` names the bundle in use (and the one before it); a restart resumes with it
    and scores the directory's bundle in shadow again. Copies keep the directory name, so the model
    id (name + manifest hash) and with it the alert ids stay the same."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pointer = root / "active.json"

    def snapshot(self, bundle: Bundle) -> Bundle:
        """A verified copy of `bundle` (made once per model id); BundleError if the files changed
        while being copied (a bundle being written right now: try again later)."""
        dest = self.root / bundle.model_id / bundle.path.resolve().name
        if not (dest / MANIFEST_NAME).is_file():
            tmp = self.root / f".{bundle.model_id}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            for rel in [*bundle.manifest.files, MANIFEST_NAME, MANIFEST_SHA_NAME]:
                target = tmp / dest.name / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(bundle.path / rel, target)
            shutil.rmtree(dest.parent, ignore_errors=True)
            os.replace(tmp, dest.parent)
        copy = load_bundle(dest, threads=bundle.threads)
        if copy.model_id != bundle.model_id:
            shutil.rmtree(dest.parent, ignore_errors=True)
            raise BundleError(f"{bundle.path}: files changed while they were copied; will retry")
        return copy

    def activate(self, bundle: Bundle) -> None:
        """Record `bundle` (a snapshot) as the one in use; keep the previous one, drop older copies."""
        state = self._read()
        previous = state.get("active")
        if previous and previous.get("model_id") == bundle.model_id:
            previous = state.get("previous")
        state = {"active": {"model_id": bundle.model_id, "path": str(bundle.path)}, "previous": previous}
        tmp = self.pointer.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.pointer)
        keep = {s["model_id"] for s in (state["active"], previous) if s}
        for d in self.root.iterdir():
            if d.is_dir() and not d.name.startswith(".") and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)

    def active(self, threads: int = 1) -> Bundle | None:
        """The bundle in use before the restart, verified; None if there is none or it is damaged."""
        entry = self._read().get("active")
        if not entry:
            return None
        try:
            return load_bundle(entry["path"], threads=threads)
        except (BundleError, OSError, KeyError) as exc:
            log.warning("the copy of the model in use before the restart is unusable: %s", exc)
            return None

    def _read(self) -> dict[str, Any]:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(self.pointer.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}
