"""Offline analysis of saved features: file I/O and the ``alignment-callback`` command line.

``alignment-callback compare A B`` calibrates the alignment of two feature files;
``alignment-callback matrix DIR_X DIR_Y`` every pair of two folders (with Benjamini–Hochberg
FDR across pairs).  See ``docs/cli.md``.
"""
