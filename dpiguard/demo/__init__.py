"""Demo upstream: a synthetic hospital (``data``) and a small DPI web application (``app``).

Everything here is fictitious. It exists to show dpiguard in front of a real HTTP service.
"""
