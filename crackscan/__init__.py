"""crackscan: real-time crack inspection for vehicle cameras.

This package holds two layers. At the bottom, what every stage shares: the wire contract
(``wire``), socket specs and keys (``sockets``), the pipeline config (``config``), the exception
root and exit statuses (``errors``) and crack geometry (``geometry``). At the top, the
application: the ``crackscan`` command (``cli``), the ``run`` supervisor (``pipeline``) and
``bench``. Between them sit the stages, the top-level packages ``acquisition``, ``inference``
and ``management``, and ``training``, which produces the models. Imports point down only
(``[tool.importlinter]`` in pyproject.toml).
"""

__version__ = "0.1.0"
