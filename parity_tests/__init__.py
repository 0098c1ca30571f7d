"""The parity suite: npgpt's hand-written forward and backward against PyTorch autograd.

Every comparison goes through npgpt.compare, which prints each tensor's max absolute and
normwise relative error before asserting. `python -m parity_tests.report` prints the whole-model
table for a student.
"""
