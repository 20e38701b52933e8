"""Offline analysis of saved features: the ``alignment-callback`` command line and its parts.

``alignment-callback compare A B`` calibrates the alignment of two feature files;
``alignment-callback matrix DIR_X DIR_Y`` every pair of two folders (with Benjamini–Hochberg
FDR across pairs, a report, resumable, sharded under ``torchrun``); ``alignment-callback
extract`` saves a model's probe activations to a feature file.  See ``docs/cli.md``.

Modules, by what they hold:

* :mod:`.cli` — argument parsing, ``main``, exit codes, the short ``run_*`` orchestrations;
* :mod:`.plan` — the measures and their options (from the registry), the settings that change
  results, the files and pairs of a matrix and which are already done;
* :mod:`.compute` — feature files to result records through the alignment engine;
* :mod:`.store` — the resumable ``pairs*.jsonl``;
* :mod:`.write` — JSON / CSV / PNG outputs, the report files, console tables, progress;
* :mod:`.distributed` — the ``torchrun`` process group and its two collectives;
* :mod:`.extract` — the ``extract`` subcommand (models from factories or checkpoints);
* :mod:`.io` — reading feature and group files.
"""
