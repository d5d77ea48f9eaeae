"""The reports computed from a run's tables, as data: each returns DataFrames and numbers, prints nothing and
writes nothing.

- ``alignment_report(run)``: DICE-E against DICE-GT per hop and variant (``alignment.py``);
- ``cascade_report(run)``: influence against hop distance and position, pairwise reciprocity (``cascade.py``);
- ``detection_report(run, horizons)``: misbehaving neighbours found by proximal influence (``detection.py``);
- ``collaborators_report(runs)``: honest accuracy, static against rewired topologies (``collaborators.py``);
- ``contributions_report(run)``: the contribution ledger against retraining (``contributions.py``).

``write_report(report, folder)`` writes a report's tables and figures (``plots.py``); the command line
(``python -m dice_ray.analyze``) and ``dice_ray.Run`` call these and decide what to print and write.
"""

from __future__ import annotations

from dice_ray.reports.alignment import Alignment, alignment_report
from dice_ray.reports.cascade import Cascade, cascade_report
from dice_ray.reports.collaborators import Collaborators, collaborators_report
from dice_ray.reports.contributions import Contributions, contributions_report
from dice_ray.reports.detection import Detection, detection_report
from dice_ray.reports.writer import write_report

__all__ = ["Alignment", "Cascade", "Collaborators", "Contributions", "Detection", "alignment_report",
           "cascade_report", "collaborators_report", "contributions_report", "detection_report", "write_report"]
