"""Offline data sets: the synthetic experiment, text files (PTB offline), binary images."""
