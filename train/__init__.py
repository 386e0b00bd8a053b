"""Classification training and evaluation: ``python -m metazoo.train`` and ``python -m metazoo.validate``."""
