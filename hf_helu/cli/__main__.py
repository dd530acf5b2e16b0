"""``python -m hf_helu.cli``: the same as the ``hf-helu`` script."""

import sys

from hf_helu.cli import main

sys.exit(main())
