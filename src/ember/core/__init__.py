"""Pure domain: ids, errors, events and the decisions made over them. No I/O here."""
