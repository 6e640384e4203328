"""python -m bsmamba2_jax.serve: the same as `bsmamba2-serve`."""

import sys

from bsmamba2_jax.serve.cli import main

sys.exit(main())
