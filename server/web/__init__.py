"""The dashboard's rendering: graph diagrams as SVG (``diagram``) and the view of runs built from
the store's records (``views``). The HTTP handlers live in ``server.api.dashboard``."""
