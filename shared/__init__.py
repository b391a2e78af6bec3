"""trainyard's common library: config, artifact store, tracking, metrics, gRPC bootstrap, model zoo."""
