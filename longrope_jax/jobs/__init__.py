"""Jobs: one module per command (``ppl``, ``passkey``, ``generate``, ``convert``, ``search``).

A job takes paths (or a model already loaded, ``loading.LoadedModel``), loads, calls the library
(functions over params, config, tokens and RoPE specs), and writes its files atomically, logs and
plots; jobs are the only modules that open paths. ``cli.py`` parses flags and calls a job's
``main``; a notebook calls a job's ``run``.
"""
