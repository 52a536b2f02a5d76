"""``python -m reparam_fx.cli``: the ``reparam-fx`` command (:mod:`reparam_fx.cli.program`)."""

import sys

from reparam_fx.cli.program import main

if __name__ == "__main__":
    sys.exit(main())
