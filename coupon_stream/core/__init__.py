"""Pure logic, no I/O: what a record is, how it changes the state, which errors can go away."""
