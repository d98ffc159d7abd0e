"""Weights: what ``weights=X`` means and the table of named weights (:mod:`.named`), finding and downloading a
checkpoint (:mod:`.download`), the official checkpoint layout and strict loading (:mod:`.layout`). Imports
nothing from the commands."""
