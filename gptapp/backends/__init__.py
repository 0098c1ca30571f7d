"""The two backends the training loop (gptapp.loop) drives: numpy (npgpt) and torch (torchgpt).

Import the one you use: gptapp.backends.numpy never imports torch (except to read a .pt file),
gptapp.backends.torch imports torch and torchgpt.
"""
