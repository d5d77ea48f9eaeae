"""``python -m dice_ray.cli``: the ``dice-ray`` console script (``dice_ray.cli.main``)."""

import sys

from dice_ray.cli.main import main

sys.exit(main())
