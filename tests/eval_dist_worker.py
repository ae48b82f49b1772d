"""torchrun worker for tests/test_eval.py: sliding, one-pass, n-gram and TTT totals on this world size -> JSON (rank 0)."""
import dataclasses
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpt as tg  # noqa: E402
from conftest import random_tables, repeating_stream, tiny_hparams, tiny_model  # noqa: E402


def main(out_path: str) -> None:
    vocab = 32
    h = tiny_hparams(vocab_size=vocab, eval_seq_len=32, eval_stride=8, eval_batch_windows=4, ngram_chunk_tokens=100,
                     ngram_audit_positions=32, ngram_log_every=3, run_id="dist")
    rt = tg.init_runtime(h)
    val = tg.ValData(repeating_stream(1500, vocab, seed=21), random_tables(vocab, 1))
    model = tiny_model(h)
    hashed = dataclasses.replace(h, ngram_mode="hashed", ngram_buckets=512)
    ttt = dataclasses.replace(h, ttt_enabled=True, ttt_chunk_tokens=200, ttt_batch_seqs=3, ttt_epochs=2, ttt_lr=0.05)
    plain, hashed_pass = tg.roundtrip_eval(model, val, h, rt), tg.roundtrip_eval(model, val, hashed, rt)
    adapted = tg.ttt_eval(model, val, ttt, rt)
    runs = {"sliding": tg.sliding_eval(model, val, h, rt), "roundtrip": plain["model"], "ngram_exact": plain["ngram"],
            "ngram_hashed": hashed_pass["ngram"], "ttt": adapted["model"], "ttt_ngram": adapted["ngram"]}
    out = {name: r._asdict() for name, r in runs.items()}
    if rt.rank == 0:
        Path(out_path).write_text(json.dumps(out))
    tg.shutdown(0)  # the script's own end: barrier, leave the group, skip gloo's C++ teardown


if __name__ == "__main__":
    main(sys.argv[1])
