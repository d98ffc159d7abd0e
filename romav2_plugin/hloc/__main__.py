"""``python -m romav2_plugin.hloc``: runs :func:`romav2_plugin.app.hloc_command.main`."""

import sys

from romav2_plugin.app.hloc_command import main

if __name__ == "__main__":
    sys.exit(main())
