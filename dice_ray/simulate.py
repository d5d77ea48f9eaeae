"""``python -m dice_ray.simulate``: the front end ``dice_ray.cli.simulate``."""

import sys

from dice_ray.cli.simulate import main

if __name__ == "__main__":
    sys.exit(main())
