"""Run-config changes the benches share (``python bench/<name>.py`` puts this folder on ``sys.path``)."""

from __future__ import annotations

import dataclasses
from typing import Any


def replays_alone(experiment: Any) -> Any:
    """``experiment`` (an ``experiment.Experiment``) with no DICE-E variant in its influence measurements, so that its
    probes' tasks time DICE-GT's replays alone. A run's config refuses an empty ``influence.variants`` (a user asks
    for DICE-GT alone by asking for no influence estimate, which is no study); a bench times that part by itself."""
    config = experiment.config
    influence = config.influence.model_copy(update={"variants": []})  # model_copy skips the field's validation
    return dataclasses.replace(experiment, config=config.model_copy(update={"influence": influence}))
