"""``gitool audit``: every update of a federated run attacked, scored and reported.

- :mod:`~gitool.audit.layout`: which updates the inputs hold, where each one's results go,
  which client and round it belongs to;
- :mod:`~gitool.audit.planner`: which attacks apply to an update, from its facts;
- :mod:`~gitool.audit.task`: one update in, its result files and a record out;
- :mod:`~gitool.audit.runners`: tasks in this process, in worker processes, or on a Dask cluster;
- :mod:`~gitool.audit.report`: ``summary.json``, ``audit.csv`` and a self-contained ``report.html``;
- :mod:`~gitool.audit.run`: all of it in order (:func:`prepare`, then :func:`run`).
"""

from gitool.audit.run import AuditOutcome, prepare, run

__all__ = ["AuditOutcome", "prepare", "run"]
