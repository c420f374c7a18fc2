"""Edge controller: renders routes into HAProxy and keeps it in sync."""
