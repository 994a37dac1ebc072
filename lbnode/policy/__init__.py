"""Sans-IO decision code: balancing algorithms, rule matching, rate-limit
math, sticky sessions, access control.

Nothing in this package performs I/O or reads the clock: every function takes
the time (``now``, float seconds of a monotonic clock) as an argument. It
imports neither trio nor sockets nor redis (a test enforces it).
"""
