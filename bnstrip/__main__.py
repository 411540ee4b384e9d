from __future__ import annotations

from bnstrip.cli import main

if __name__ == "__main__":
    main()
