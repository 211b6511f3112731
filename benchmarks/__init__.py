"""jaxckpt's benchmark scripts (source checkout only): ``python -m benchmarks.run`` or ``jaxckpt bench`` runs them."""
