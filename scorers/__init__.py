"""Pure scoring functions: arrays in, per-sample scores out.

The protocol every scorer follows:
- a plain function, numpy arrays in, a numpy array (or a small dataclass of arrays) out;
- every knob keyword-only, with the paper's default;
- no Prefect, no file I/O, no global state; randomness only from an explicit ``seed``;
- the docstring names the method, the source paper and the score's orientation.

Orientation: a higher score means more worth keeping, unless the docstring says otherwise.
"""
