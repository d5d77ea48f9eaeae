"""``python -m dice_ray.sweep``: see ``dice_ray.sweep.cli``."""

import sys

from dice_ray.sweep.cli import main

sys.exit(main())
