"""``python -m dice_ray.sweep``: the front end ``dice_ray.cli.sweep``."""

import sys

from dice_ray.cli.sweep import main

sys.exit(main())
