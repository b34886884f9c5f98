"""Configuration, Ray runtime, storage helpers and the command line of slidestream."""
