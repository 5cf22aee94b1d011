"""Built-in calibrators, found by the core through the `quantlab.calibrators` entry-point group."""
