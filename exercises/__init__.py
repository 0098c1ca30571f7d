"""Backprop exercises: write a layer's backward yourself, and have it checked and diagnosed.

    python -m exercises list
    python -m exercises start layernorm          # writes my_backprop/layernorm.py: the question
    python -m exercises check layernorm my_backprop/layernorm.py
    python -m exercises status

Imports npgpt and the standard library only.
"""
