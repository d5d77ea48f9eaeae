"""The command-line front ends: they parse arguments, call the Python API or a report, and print. Nothing in the
library imports them.

- ``simulate``  ``python -m dice_ray.simulate``: run (or ``--resume``) a simulation
- ``analyze``   ``python -m dice_ray.analyze``: the reports of a run's tables, printed and written
- ``sweep``     ``python -m dice_ray.sweep``: a hyper-parameter sweep on Ray Tune
- ``main``      the ``dice-ray`` console script: ``dice-ray simulate|analyze|sweep …`` (also ``python -m dice_ray``)

``dice_ray/simulate.py``, ``dice_ray/analyze.py`` and ``dice_ray/sweep/__main__.py`` only make the ``python -m``
names work.
"""
