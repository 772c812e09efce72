"""Sub-commands of the ``biopsyquant`` CLI (one module each)."""
