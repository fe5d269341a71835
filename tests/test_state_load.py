"""Loading a restored model state without copying it (``take_module_state``): a joiner's
received state of hundreds of MB becomes the model's storage, the parameters stay the objects
the optimizer and DDP hold, and anything ``load_state_dict`` would treat specially loads by
copy instead."""
from __future__ import annotations

import torch

from adaptrun.worker.state import take_module_state


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5),
                               torch.nn.Linear(5, 1))


def test_the_restored_tensors_become_the_parameters_without_a_copy():
    model, other = _model(0), _model(1)
    other(torch.randn(8, 6))                  # BatchNorm running stats differ from model's
    state = {k: v.clone() for k, v in other.state_dict().items()}
    params = list(model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=0.1)

    assert take_module_state(model, state)

    assert list(model.parameters()) == params          # the same Parameter objects
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
        assert v.data_ptr() == state[k].data_ptr(), f"{k} was copied"
    assert all(p.requires_grad for p in model.parameters())
    before = model[0].weight.detach().clone()
    model(torch.randn(8, 6)).sum().backward()
    opt.step()                                          # the optimizer still drives them
    assert not torch.equal(model[0].weight, before)


def test_what_load_state_dict_treats_specially_is_left_to_it():
    base = _model(0)
    state = {k: v.clone() for k, v in _model(1).state_dict().items()}
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}

    missing = dict(state)
    missing.pop("2.bias")
    wrong_dtype = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    assert not take_module_state(base, missing)
    assert not take_module_state(base, wrong_dtype)
    hooked = _model(0)
    hooked.register_load_state_dict_post_hook(lambda module, keys: None)
    assert not take_module_state(hooked, state)
    for k, v in base.state_dict().items():              # nothing changed by a refusal
        assert torch.equal(v, snapshot[k]), k
