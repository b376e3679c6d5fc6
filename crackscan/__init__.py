"""crackscan: real-time crack inspection for vehicle cameras.

This package holds what the stages share (the wire contract, socket specs, pipeline config) and
the ``crackscan`` command. The stages themselves are the top-level packages ``acquisition``,
``inference`` and ``management``; ``training`` produces the models.
"""

__version__ = "0.1.0"
