import sys

from spadi_ao.cli import main

sys.exit(main())
