"""The built-in configs, installed with the package as ``longrope_jax.configs``.

One folder per command; each folder's ``default.py`` states every setting of its command with its
default (the only place it is stated), and the other configs build on it by import:

    from longrope_jax.configs.train import default
    c = default.get_config(); c.lr = 1e-4

``--config NAME`` (``tiny``, ``train/tiny``) finds a built-in config; ``--config PATH`` any file
defining ``get_config()`` (its settings are merged onto the command's defaults; an unknown key is
an error).
"""
