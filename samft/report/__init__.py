"""``samft report``: a self-contained HTML page about one run or several side by side (:func:`build_report`,
:func:`write_report`)."""

from samft.report.build import build_report
from samft.report.write import write_report

__all__ = ["build_report", "write_report"]
