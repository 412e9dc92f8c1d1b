"""The read side: followers of the event log and the views they maintain.

Layout: ``store`` (views database per backend), ``registry`` (active generation and
tracking position per view), ``view`` (the base of every view), ``follower`` (applying
the log exactly once; status; wait_for; rebuild), ``loan_files`` and ``audit_trail``
(the views and their queries), ``runner`` (all views of a process in threads).
Projections read the archive's events only; they never import the API.
"""
