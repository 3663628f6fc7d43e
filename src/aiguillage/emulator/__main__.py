"""`python -m aiguillage.emulator --engines 4 --base-port 9001 …`: see docs/emulator.md."""

from aiguillage.emulator.server import main

if __name__ == "__main__":
    main()
