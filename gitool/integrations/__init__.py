"""Bridges from federated-learning frameworks to gitool's files.

Each module here records what a framework's server receives as gitool update files, so
that every attack command reads them as it reads a capture. A module imports its
framework when it is imported; install the matching extra (``pip install
'gitool[flower]'``) to use it.
"""
