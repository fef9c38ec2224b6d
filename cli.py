"""Thin shim: ``python cli.py …`` is ``mqpredict …``."""

from mqpredict.cli.main import main

if __name__ == "__main__":
    main()
