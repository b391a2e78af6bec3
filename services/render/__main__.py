"""`python -m services.render --port N --metrics-port M` starts the render service."""
from services.render.server import main

# Guarded: worker processes started with forkserver/spawn import the main module again.
if __name__ == "__main__":
    main()
