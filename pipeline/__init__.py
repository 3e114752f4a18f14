"""copdssl pipeline stages: CT I/O, synthetic cohort, preprocessing, evaluation and report.

Library code here never imports ``snakemake``; Snakemake rules call the ``copdssl`` CLI
(:mod:`pipeline.cli`), so every stage also runs by hand.
"""

__version__ = "0.1.0"
