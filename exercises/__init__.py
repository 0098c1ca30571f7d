"""Backprop exercises: write a layer's backward yourself, and have it checked and diagnosed.

    python -m exercises list
    python -m exercises start layernorm          # writes my_backprop/layernorm.py: the question
    python -m exercises check layernorm my_backprop/layernorm.py
    python -m exercises status

Commands
    list                      every exercise, one line each: its name, what it teaches, and the
                              section of docs/gradients.md that derives it.
    start NAME [--dir DIR] [--force]
                              writes DIR/NAME.py (DIR defaults to my_backprop): the signature
                              NAME_backward(dout, cache), the forward's formula and the cache's fields
                              (with their shapes) as comments, the link to the derivation, and a body
                              that raises NotImplementedError. An existing file is never overwritten
                              without --force.
    check NAME FILE [--timeout S]
                              imports NAME_backward from FILE and runs it on every case of the
                              exercise (several shapes and seeds; T = 1, one head, a repeated token id,
                              zero inputs where they matter), against the reference backward (kind
                              chain of npgpt.bounds: your sums may run in another order) and centred
                              finite differences in float64 (npgpt.gradcheck). Prints one row per
                              gradient: max abs error, normwise relative error, finite-difference
                              error, pass or FAIL; under it, for a failed gradient, what is wrong with
                              it (exercises.diagnose) and the known mistake it matches
                              (exercises.catalogue). When FILE also defines NAME_forward, its output
                              is checked against the reference forward's and the backward runs on
                              its caches. Your code runs in a process of its own, at most S seconds
                              for all cases together (default 20); nothing in FILE's directory
                              changes (no bytecode is written), and arrays travel as .npy files
                              through a temporary directory elsewhere (no pickle).
    status [DIR]              a table: each exercise, its file in DIR (default my_backprop), and
                              whether it passes, fails (which gradients), is not written yet (the
                              template's NotImplementedError) or cannot be checked.

Exit codes of check
    0   every gradient (and the forward, if FILE defines one) passes.
    1   checked and wrong: a gradient off its bounds or holding NaN or inf; a return value of the
        wrong count, shape or dtype ("returned 2 arrays, expected 3: dx, dw, db"); an exception
        in NAME_backward or NAME_forward (NotImplementedError: not written yet), shown with the
        frames of FILE only; the time limit reached (an infinite loop); the process killed.
    2   nothing to check: an unknown exercise, FILE missing, a syntax error (FILE and line), an
        exception while importing FILE, no function NAME_backward in FILE, a bad option.
list and start exit 0, or 2 on bad input (an unknown name, an existing file without --force);
status exits 0 once it prints its table, 2 when DIR does not exist.

The exercises, in the order `list` prints them: linear, relu, gelu, gelu_tanh, dropout, softmax,
cross_entropy, layernorm, embedding, attention (causal attention over q, k, v per head), block,
model (GPT.backward's composition: model_forward(idx, targets, params, config) and
model_backward(dloss, cache) -> {parameter name: gradient}), rmsnorm, rope, relu2, swiglu.

Modules: registry (the exercises and their cases), check (the comparison and the table), sandbox
and _worker (the student's process), template (start's file), reference (the model's pair),
cli (the commands; main(argv) returns the exit code). Imports npgpt and the standard library only.
"""
