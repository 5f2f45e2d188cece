"""Pure logic, no I/O: what a record is and how it changes the state."""
