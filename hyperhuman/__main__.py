import sys

from hyperhuman.cli import main

sys.exit(main())
