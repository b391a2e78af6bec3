"""`python -m services.inference --port N --metrics-port M` starts the inference service."""
from services.inference.server import main

main()
