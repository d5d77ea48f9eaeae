"""``python -m dice_ray``: the ``dice-ray`` console script (``dice-ray simulate|analyze|sweep …``)."""

import sys

from dice_ray.cli.main import main

sys.exit(main())
