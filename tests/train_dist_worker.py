"""torchrun worker for tests/test_training.py: train() with a skewed clock on rank 1 -> per-rank JSON of the
LR scale and QAT state every step used. Usage: train_dist_worker.py DATA_PATH VOCAB OUT_PREFIX"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpt as tg  # noqa: E402
from conftest import FakeClock, tiny_hparams  # noqa: E402


def main(data_path: str, vocab: int, out_prefix: str) -> None:
    h = tiny_hparams(data_path=data_path, vocab_size=vocab, iterations=60, max_wallclock_seconds=1.0,
                     warmdown_iters=10, qat_time_frac=0.5, qat_enabled=True, swa_enabled=False,
                     train_batch_tokens=128, train_micro_batch_tokens=64, run_id="skew")
    rt = tg.init_runtime(h)
    torch.manual_seed(0)
    model = tg.build_model(h, rt)
    opt = tg.build_optimizers(model, h, rt)
    seen, real_step = [], tg.train_step

    def recording_step(m, o, loader, hh, r, step, scale):
        seen.append({"step": step, "scale": scale, "qat": model.qat_active})
        return real_step(m, o, loader, hh, r, step, scale)

    tg.train_step = recording_step
    result = tg.train(model, model, opt, None, h, rt, clock=FakeClock(0.010 if rt.rank == 0 else 0.037))
    Path(f"{out_prefix}.{rt.rank}.json").write_text(json.dumps({"steps": result.steps, "seen": seen}))
    tg.shutdown(0)  # the script's own end: barrier, leave the group, skip gloo's C++ teardown


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
