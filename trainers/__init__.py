"""Ray Train loops and Tune sweeps (MIL, MHIM-MIL, ICMIL, Giga-SSL, CDMA)."""
