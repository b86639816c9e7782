import sys

from facedis.pretrained import main

sys.exit(main())
