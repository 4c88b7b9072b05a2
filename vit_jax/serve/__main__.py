"""python -m vit_jax.serve: see vit_jax/serve/cli.py."""

import sys

from vit_jax.serve import cli

sys.exit(cli.main())
