"""``python -m mixprec`` runs the command line."""

import sys

from mixprec.cli.app import main

sys.exit(main())
