"""`python -m gpujobq.client`: the same as the `gpujobq` command."""

import sys

from gpujobq.client.cli import main

sys.exit(main())
