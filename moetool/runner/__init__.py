"""The forward runner: builds a transformers model from a Checkpoint and records routing.

Two modes: `full` loads the whole model on the device; `streamed` builds the model on
the meta device and loads one decoder layer at a time (just before it runs, freed right
after), so a model larger than the device's memory can be run. All torch imports are
local to this package.
"""
