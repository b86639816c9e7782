import sys

from facedis.pretrained.build import main

sys.exit(main())
