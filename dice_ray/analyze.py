"""``python -m dice_ray.analyze``: the front end ``dice_ray.cli.analyze``."""

import sys

from dice_ray.cli.analyze import main

if __name__ == "__main__":
    sys.exit(main())
