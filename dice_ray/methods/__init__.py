"""The methods: each one a round hook (``dice_ray.hooks``) with its driver state and its tables.

- ``proximal``       proximal influence p_{k←l}: every examiner scores its in-neighbours online (concepts §5)
- ``contributions``  the contribution ledger L[j→k]: DICE-E of every update (every variant)
- ``dice/``          DICE: probes, ground truth by replay, the estimator (replayed or ``online.py`` in the loop)
- ``rewiring``       collaborator selection: a new W every K rounds from the proximal ledger
- ``retraining``     leave-one-participant-out and Shapley ground truth for contributions: a stage after training

Round hooks and stages after training (``dice/replays.py``: DICE-GT by replay; ``retraining``) run through the
engines and the task backend (``dice_ray.engine``), which know no method by name. A new method is a module beside
these with a ``Method`` and its options (a ``Section``); pass it to ``dice_ray.run(..., methods=[...])`` or add it to
``METHODS`` (``catalog.py``; the built-in sections' order is ``config.METHOD_SECTIONS``). Methods run in list order.
This package's ``__init__`` imports nothing: the run config imports the methods' options from their modules.
"""
