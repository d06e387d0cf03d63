"""``python -m rom_fast``: the rom-fast command line."""

import sys

from rom_fast.cli import main

sys.exit(main())
