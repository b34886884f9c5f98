"""Ray Tune sweeps: search spaces, ASHA, and what each training kind reports to compare trials."""
