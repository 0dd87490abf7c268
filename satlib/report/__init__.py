"""What the chapters and the command line share to report results (Chapters 1 and 5, the appendices).

- ``chapter``: a chapter's parameters validated in one call (``chapter_config``), the paper's tables
  with the book's column names (``paper_table``);
- ``checks``: the gradient-masking checks as a frame of named pass/fail lines (``gradient_masking``);
- ``table1``: Table 1 over seeds, mean and spread, and paired verdicts;
- ``stats``: paired differences over seeds with their confidence intervals;
- ``ledger``: the paper's claims and the verdicts the chapters record on them.
"""
from .chapter import ChapterConfig, chapter_config, paper_table, tag
from .checks import eps_sweep, gradient_masking, masking_checks, transfer_accuracy

__all__ = ["ChapterConfig", "chapter_config", "eps_sweep", "gradient_masking", "masking_checks", "paper_table",
           "tag", "transfer_accuracy"]
