"""``python -m romav2_plugin.hloc``: the entry point of the hloc command (:mod:`romav2_plugin.app.hloc_command`;
the Python API: :mod:`romav2_plugin.app.hloc`)."""
