"""Evaluation: the compositional judge for the ``shapes`` domain."""
