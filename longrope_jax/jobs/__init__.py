"""Jobs: one module per command (``ppl``, ``passkey``, ``generate``, ``convert``, ``search``,
``train``).

A job takes paths (or a model already loaded, ``loading.LoadedModel``), loads, calls the library
(functions over params, config, tokens and RoPE specs), and writes its files atomically, logs and
plots; jobs are the only modules that open paths. ``cli.py`` parses flags and calls a job's
``main``, which starts the multi-process runtime (``parallel.from_settings``: once per process,
so several jobs may run one after another in one process) and calls its ``run``; a notebook or a
pipeline calls ``run`` itself.
"""
