import sys

from longrope_jax.cli import main

sys.exit(main())
