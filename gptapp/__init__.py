"""gptapp: the training application that drives npgpt or torchgpt.

Settings and presets (settings), flags and one-line errors (cli, errors), the run log (run_log),
checkpoint files (checkpoint, torch_checkpoint), the training text (data), one training loop
(loop) and the two backends it drives (backends.numpy, backends.torch). Importing this package
imports neither torch nor a backend; the backend a script picks imports its own model.
"""
