import sys

from mmtrain.memory.cli import main

sys.exit(main())
