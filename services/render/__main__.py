"""`python -m services.render --port N --metrics-port M` starts the render service."""
from services.render.server import main

main()
