"""MIL training (ABMIL, TransMIL, DSMIL, CLAM-SB, DTFD, max-pooling) with or without MHIM: the fold
loop, the run driver, prediction and scoring of new slides."""
