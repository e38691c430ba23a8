"""``python -m laplace_tf.cli``: the ``laplace-tf`` command."""

import sys

from laplace_tf.cli import main

sys.exit(main())
