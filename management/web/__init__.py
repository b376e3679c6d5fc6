"""The web application for crack records (``crackscan serve``): :mod:`management.web.app`."""
