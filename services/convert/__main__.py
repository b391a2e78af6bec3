"""`python -m services.convert --port N --metrics-port M` starts the convert service."""
from services.convert.server import main

# Guarded: worker processes started with forkserver/spawn import the main module again.
if __name__ == "__main__":
    main()
