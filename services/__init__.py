"""trainyard's gRPC services: one package each, ``python -m services.<name>`` starts one."""
