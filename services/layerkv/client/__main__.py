import sys

from layerkv.client.cli import main

sys.exit(main())
