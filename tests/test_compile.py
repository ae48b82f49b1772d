"""torch.compile(fullgraph=True) with the inductor backend on CPU, tiny dims: the training forward+backward is one
graph with QAT off and one with QAT on (no graph breaks), and the compiled int6 fake-quant equals the export grid
bit for bit. Run: python3 -m pytest tests/test_compile.py"""
import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.compile_fx import compile_fx

import train_gpt as tg

pytestmark = pytest.mark.slow  # inductor compiles C++ kernels: tens of seconds


def test_training_forward_backward_is_one_inductor_graph_with_qat_off_and_on(tiny):
    h = tiny(num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, rope_dims=8, vocab_size=64,
             bigram_vocab_size=32, bigram_dim=8, train_seq_len=16)
    torch._dynamo.reset()
    counters.clear()
    graphs = []

    def recording_inductor(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch.manual_seed(0)
    model = tg.build_model(h).train()
    banks = [p for name, p in model.named_parameters() if name.endswith("_bank")]  # W_q/W_o, W_k/W_v, W_up, W_down
    assert len(banks) == 4
    with torch.no_grad():  # zero W_o / W_down at init would hide the quantized banks from the loss
        for bank in banks:
            bank.normal_(std=0.2)
    compiled = torch.compile(model, backend=recording_inductor, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, h.vocab_size, (2, 16), generator=g) for _ in range(2))
    losses = {}
    for qat in (False, True):
        model.qat_active = qat
        model.zero_grad(set_to_none=True)
        loss = compiled(x, y)
        loss.backward()
        assert len(graphs) == 1 + qat  # one graph per QAT state: the whole forward, no breaks
        assert all(bank.grad is not None for bank in banks)
        torch.testing.assert_close(loss, model(x, y), rtol=1e-4, atol=1e-4)
        losses[qat] = loss.item()
    assert not counters["graph_break"] and losses[True] != losses[False]


def test_compiled_fake_quant_is_the_export_grid_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(3, 16, 96, generator=g) * 30  # scales well above the 1/31 floor: fp16 rounding matters
    fake = torch.compile(tg.fake_quantize_int6, fullgraph=True, dynamic=False)(bank)
    assert torch.equal(fake, tg.dequantize_rows(*tg.quantize_int6_rows(bank)))
