"""What lbnode nodes and lbctl share: config models, events, projections, the event-log store."""

__version__ = "0.1.0"
