"""`python -m adm` (and `torchrun ... -m adm`): the `adm` command."""

import sys

from adm.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
