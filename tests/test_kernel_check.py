"""DenseEncoder's check of the Triton kernels on their first forward, on the CPU: the attention
kernels (the key-key sum and step 4) are made to look available and are replaced by the eager
steps (they agree), or step 4's by one that returns zeros (a broken kernel) or raises (one that
does not compile)."""
import logging

import pytest
import torch

from rfclip_engine import RFCLIPConfig, kernels
from rfclip_engine import model as model_module
from rfclip_engine.graphs import DenseEncoder
from rfclip_engine.kernels import attention

from .test_encoder import scene

CONFIG = RFCLIPConfig(sigma=1.5)  # the tiny model has distraction tokens at this sigma
EAGER = RFCLIPConfig(sigma=1.5, triton_kernels=False)


def eager_key_key(k, key_key_sum, head_mean):
    return model_module._accumulate_key_key(k, key_key_sum, [slice(None)], head_mean, False)


def eager_step_4(q, k, v, distraction, defocused, beta):
    return model_module._refocused_attention(q, k, v, distraction, defocused, beta, [slice(None)], False)


def zeros(q, k, v, distraction, defocused, beta):
    return torch.zeros_like(v)


def fails(q, k, v, distraction, defocused, beta):
    raise RuntimeError("out of resources: shared memory")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Makes the attention kernels look available on the CPU; returns how often each replacement
    of step 4's kernel ran, and the function that installs one."""
    calls = []
    monkeypatch.setattr(kernels, "usable", lambda device, tokens, capability=(7, 0): True)
    monkeypatch.setattr(kernels, "available", lambda tensor, capability=(7, 0): False)  # steps 1-3 stay eager
    monkeypatch.setattr(attention, "available", lambda projections: True)
    monkeypatch.setattr(attention, "accumulate_key_key", eager_key_key)

    def install(step_4):
        def counted(*args):
            calls.append(step_4.__name__)
            return step_4(*args)
        monkeypatch.setattr(attention, "refocused_attention", counted)

    return calls, install


@torch.no_grad()
def test_kernels_that_agree_are_kept(tiny_model, kernel_calls, caplog):
    calls, install = kernel_calls
    install(eager_step_4)
    pixels = scene(2, 64, 0)
    tiny_model.encode_dense(pixels, CONFIG)
    per_forward = len(calls)  # step 4 in every block but the last
    assert per_forward > 0
    encoder = DenseEncoder(tiny_model)
    caplog.set_level(logging.INFO, logger="rfclip_engine.graphs")
    torch.testing.assert_close(encoder(pixels, CONFIG), tiny_model.encode_dense(pixels, EAGER), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2 * per_forward  # checked once with the kernels, whose features it returned
    encoder(scene(3, 64, 1), CONFIG)  # another batch of the same crops: no second check
    assert len(calls) == 3 * per_forward
    [record] = caplog.records  # one line for the operator: the check ran and passed
    assert record.levelno == logging.INFO and "passed their check" in record.getMessage()


@pytest.mark.parametrize("step_4, reason", [(zeros, "from the eager steps'"),
                                            (fails, "RuntimeError: out of resources")])
@torch.no_grad()
def test_kernels_that_disagree_or_fail_give_way_to_the_eager_steps(tiny_model, kernel_calls, caplog, monkeypatch,
                                                                    step_4, reason):
    calls, install = kernel_calls
    install(step_4)
    forwards = []
    encode = tiny_model.encode_dense
    monkeypatch.setattr(tiny_model, "encode_dense", lambda *args: forwards.append(1) or encode(*args))
    encoder = DenseEncoder(tiny_model)
    caplog.set_level(logging.WARNING, logger="rfclip_engine.graphs")
    pixels = scene(2, 64, 0)
    features = encoder(pixels, CONFIG)
    assert len(forwards) == 2  # the check's two: its eager features are the call's
    assert torch.equal(features, encode(pixels, EAGER))
    [record] = caplog.records
    assert reason in record.getMessage() and "RFCLIP_TRITON_KERNELS=false" in record.getMessage()
    checked = len(calls)
    assert checked > 0
    more = scene(3, 64, 1)
    assert torch.equal(encoder(more, CONFIG), encode(more, EAGER))
    assert len(forwards) == 3 and len(calls) == checked and len(caplog.records) == 1  # decided once for these crops
    encoder(scene(1, 96, 2), CONFIG)  # other crops: checked on their own
    assert len(calls) > checked and len(caplog.records) == 2


@pytest.mark.parametrize("config", [EAGER, RFCLIPConfig(mode="clip")])
@torch.no_grad()
def test_no_check_where_no_kernel_would_run(tiny_model, kernel_calls, monkeypatch, config):
    forwards = []
    encode = tiny_model.encode_dense
    monkeypatch.setattr(tiny_model, "encode_dense", lambda *args: forwards.append(1) or encode(*args))
    DenseEncoder(tiny_model)(scene(2, 64, 0), config)
    assert len(forwards) == 1


@torch.no_grad()
def test_no_check_off_the_gpu(tiny_model, monkeypatch):
    forwards = []
    encode = tiny_model.encode_dense
    monkeypatch.setattr(tiny_model, "encode_dense", lambda *args: forwards.append(1) or encode(*args))
    DenseEncoder(tiny_model)(scene(2, 64, 0), CONFIG)
    assert len(forwards) == 1 and not kernels.usable(torch.device("cpu"), 16)


@torch.no_grad()
def test_the_check_asks_about_the_crops_own_token_count(tiny_model, monkeypatch):
    """Whole images of more patch tokens than a kernel holds keep the eager steps: no check."""
    asked = []
    monkeypatch.setattr(kernels, "usable", lambda device, tokens, capability=(7, 0): asked.append(tokens) or False)
    DenseEncoder(tiny_model)(scene(1, 64, 0)[..., :48], CONFIG)
    patch = tiny_model.patch_size
    assert asked[0] == (64 // patch) * (48 // patch)
