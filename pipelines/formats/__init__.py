"""Slide readers behind one interface: which backend reads a slide is decided by its content."""
