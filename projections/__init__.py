"""The read side: followers of the event log and the views they maintain."""
