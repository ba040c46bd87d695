import sys

from raytune_it.cli import main

sys.exit(main())
