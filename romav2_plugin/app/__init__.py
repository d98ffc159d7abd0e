"""The commands and what they share.

* :mod:`.cli`: ``romav2-match``; :mod:`.hloc_command`: ``python -m romav2_plugin.hloc`` (hloc's dense matching,
  :mod:`.hloc`); ``romav2-export`` and ``romav2-train`` live with what they run (:mod:`romav2_plugin.export`,
  :mod:`romav2_plugin.train`).
* :mod:`.errors`: the conventions of every command: exit codes, one-paragraph errors, output checks;
  :mod:`.weights_option`: one meaning of ``--weights``.
* :mod:`.matching`: one pair with a loaded model; :mod:`.pairs`: the one pairs job (validate, open/repair/resume
  the results file, write each pair, report) run by the local executor here or the Ray executor
  (:mod:`romav2_plugin.distributed`).
* :mod:`.results`: the results files; :mod:`.summary`: what is printed; :mod:`.visualize`: the pictures.
"""
