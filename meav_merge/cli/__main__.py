import sys

from meav_merge.cli.main import main

sys.exit(main())
