"""Model shapes of the families users bring: the Hub id and the config.json fields of each (the
``plan`` command builds the shape from them; pipelines name the model).
"""
