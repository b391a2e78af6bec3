"""The render service: procedural dataset generators and the sharded, resumable dataset writer."""
