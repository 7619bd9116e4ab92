"""``python -m i2am ...``: a thin entry point to the analysis CLI in :mod:`apps.cli`.

The CLI is an application of this library, not part of it, so it lives in ``apps``;
this module only forwards to it (the one exemption of the import-direction test).
"""
import sys

if __name__ == "__main__":
    from apps.cli import main

    sys.exit(main())
