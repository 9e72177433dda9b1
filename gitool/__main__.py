"""`python -m gitool` runs the command line."""

import os
import sys

# `python -m` puts the working directory first on sys.path, so a stray torch.py or
# numpy.py there would be imported in place of the real one. gitool imports nothing from
# the working directory unless the user names a module there (--model mymodule:factory).
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from gitool.cli import main  # noqa: E402

if __name__ == "__main__":  # not when a spawned worker process re-imports this module (gitool audit --workers)
    main()
