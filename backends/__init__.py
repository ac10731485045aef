"""Built-in backends. Each registers through the ``seahal.backends`` entry point, like any plugin."""
