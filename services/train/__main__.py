"""`python -m services.train --port N --metrics-port M` starts the train service."""
from services.train.server import main

# Guarded: worker processes started with forkserver/spawn import the main module again.
if __name__ == "__main__":
    main()
