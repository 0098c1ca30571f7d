"""--optimizer muon for the NumPy backend: npgpt.optim.Muon for the 2-D matrices inside the blocks,
an AdamW (the fast one, or npgpt.optim's with --reference) for the embeddings, the head and every
1-D gain and bias: the speedrun practice. torchgpt.model.configure_muon_adamw is the torch side,
with the same split (tests/test_train_modern.py checks both)."""
from __future__ import annotations

import numpy as np

from npgpt.optim import Muon


def uses_muon(name: str, shape) -> bool:
    """A matrix inside a block (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj): Muon's."""
    return name.startswith("transformer.h.") and len(shape) == 2


class MuonAdamW:
    """Two optimizers behind AdamW's interface: step(grads, lr), state_dict(), load_state_dict().

    `lr` is AdamW's scheduled rate; Muon's follows the same schedule scaled by muon_lr /
    learning_rate, so both warm up and decay together. The weight decay applies to both (Muon's is
    decoupled as AdamW's). The state is one flat dict, "adamw.*" and "muon.*" (npz-safe).
    """

    def __init__(self, params: dict[str, np.ndarray], adamw_class, lr: float, betas, weight_decay: float,
                 muon_lr: float, muon_class=Muon):
        self.params = params
        self.lr = lr
        muon = {n: p for n, p in params.items() if uses_muon(n, p.shape)}
        self.muon = muon_class(muon, lr=muon_lr, weight_decay=weight_decay)
        self.adamw = adamw_class({n: p for n, p in params.items() if n not in muon}, lr=lr, betas=betas,
                                 weight_decay=weight_decay)

    def step(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        lr = self.lr if lr is None else lr
        self.muon.step({n: grads[n] for n in self.muon.params}, lr=self.muon.lr * lr / self.lr)
        self.adamw.step({n: grads[n] for n in self.adamw.params}, lr=lr)

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {f"adamw.{k}": v for k, v in self.adamw.state_dict().items()}
        state.update({f"muon.{k}": v for k, v in self.muon.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Both or neither: Muon's part is checked by loading it into a copy first."""
        parts = {"adamw": {}, "muon": {}}
        for key, value in state.items():
            prefix, _, rest = key.partition(".")
            if prefix not in parts:
                raise ValueError(f"optimizer state has {key}: it was not saved with --optimizer muon")
            parts[prefix][rest] = value
        probe = Muon({n: p.copy() for n, p in self.muon.params.items()})
        probe.load_state_dict(parts["muon"])  # raises, naming the problem, before anything changes
        self.adamw.load_state_dict(parts["adamw"])
        self.muon.load_state_dict(parts["muon"])
