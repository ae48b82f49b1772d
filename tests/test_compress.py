"""tools/compress.py: the arithmetic coder is exact, decode(encode(x)) == x with the evaluator's distributions
(plain, n-gram mixture, TTT), the coded size matches the evaluator's bits, and bad input fails in one line."""

import json

import numpy as np
import pytest
import torch

import compress
import train_gpt as tg
from conftest import tiny_hparams

TARGETS = 160


def test_coder_round_trips_and_costs_the_code_length():
    """Random sharp and flat distributions over 300 symbols: exact round trip; size = sum -log2 q + < 16 bits."""
    g = torch.Generator().manual_seed(0)
    enc, cums, symbols, ideal = compress.ArithmeticEncoder(), [], [], 0.0
    for i in range(400):
        p = torch.softmax(torch.randn(300, generator=g, dtype=torch.float64) * (8.0 if i % 2 else 0.5), dim=-1)
        cum = compress.frequencies(p)
        s = int(torch.multinomial(p, 1, generator=g))
        enc.encode(int(cum[s]), int(cum[s + 1]), compress.FREQ_TOTAL)
        ideal -= np.log2((cum[s + 1] - cum[s]) / compress.FREQ_TOTAL)
        cums.append(cum)
        symbols.append(s)
    data = enc.finish()
    dec = compress.ArithmeticDecoder(data)
    assert [dec.decode(c) for c in cums] == symbols
    assert ideal <= 8 * len(data) <= ideal + 16


def test_frequencies_total_and_floor():
    p = torch.tensor([1.0 - 1e-12, 1e-12, 0.0, 0.0], dtype=torch.float64)
    f = np.diff(compress.frequencies(p))
    assert f.sum() == compress.FREQ_TOTAL and f.min() >= 1 and f[0] == compress.FREQ_TOTAL - 3
    with pytest.raises(RuntimeError):
        compress.frequencies(torch.tensor([0.5, float("nan")], dtype=torch.float64))


def write_artifact(h, path, seed):
    """Random weights (the zero-initialized output projections perturbed too), packed as train_gpt exports."""
    torch.manual_seed(seed)
    model = tg.build_model(h)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.add_(torch.randn_like(p) * 0.05)
    path.write_bytes(tg.pack_artifact(model.state_dict(), h)[0])
    return str(path)


@pytest.fixture(scope="module")
def setup(tiny_corpus, tmp_path_factory):
    data, tok, vocab = tiny_corpus
    root = tmp_path_factory.mktemp("compress")
    h = tiny_hparams(data_path=data, tokenizer_path=tok, vocab_size=vocab, ngram_chunk_tokens=48,
                     ttt_chunk_tokens=64, ttt_epochs=1, ttt_lr=0.05)
    env = dict(compress.coded_settings(h), DATA_PATH=data)
    return root, env, write_artifact(h, root / "a.ptz", 0), write_artifact(h, root / "b.ptz", 1)


def run(argv, env, capsys):
    code = compress.main(argv, env)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("mode", [[], ["--ngram"], ["--ttt"]], ids=["plain", "ngram", "ttt"])
def test_encode_decode_round_trip(setup, mode, capsys):
    root, env, artifact, _ = setup
    out, report = root / f"x{len(mode)}{''.join(mode)}.pgc", root / "r.json"
    code, stdout, err = run(["encode", "--artifact", artifact, "--tokens", str(TARGETS), "-o", str(out),
                             "--json", str(report)] + mode, env, capsys)
    assert code == 0, err
    r = json.loads(report.read_text())
    assert r["decoded_identical"] is True and r["targets"] == TARGETS
    payload_bytes = r["payload_bits"] / 8
    assert abs(payload_bytes - r["claimed_bits"] / 8) <= 0.01 * r["claimed_bits"] / 8 + 64
    assert out.stat().st_size == payload_bytes + r["header_bytes"]
    code, _, err = run(["decode", "--artifact", artifact, str(out), "-o", str(root / "x.txt")], {}, capsys)
    assert code == 0, err
    tokens = compress.validation_tokens(compress.settings_from(env), TARGETS)
    sp = compress.load_sp(env["TOKENIZER_PATH"])
    assert (root / "x.txt").read_text(encoding="utf-8") == compress.text_of(tokens, sp)


def test_ngram_coder_reads_the_evaluator_s_distributions(setup):
    """With --ngram the coder's fp64 distributions give the evaluator's score target by target (summed): the learned
    mixer learns from each coded target and steps after each chunk exactly as in the evaluator's pass."""
    root, env, artifact, _ = setup
    model, h = compress.load_model(artifact, compress.settings_from(env), env)
    tokens = compress.validation_tokens(h, TARGETS)
    dists = compress.Distributions(model, h, tokens.clone(), compress.FLAG_NGRAM)
    nll = 0.0
    for c0, c1, pieces in dists.chunks:
        for w in map(compress.Window._make, pieces.tolist()):
            logits = dists.logits(w)
            for p in range(w.score_from, w.end + 1):
                dist = dists.scorer.full_distribution(logits[p - w.start - 1][None], torch.tensor([p]))
                nll -= float(torch.log(dist[0, tokens[p]]))
                dists.coded(logits, w, p)
        dists.after_chunk(c0, c1)
    assert dists.scorer.mixer.kind == "learned" and float(dists.scorer.mixer.seen.sum()) > 0
    tables = tg.build_byte_luts(compress.load_sp(env["TOKENIZER_PATH"]), h.vocab_size)
    claimed = compress.evaluator_bits(model, h, tokens, tables, compress.FLAG_NGRAM)
    assert nll == pytest.approx(claimed.loss * claimed.tokens, rel=1e-6)


def test_ngram_and_ttt_change_the_code(setup):
    """The mixture and the adapted weights are really used: each mode codes the same targets differently."""
    root, env, artifact, _ = setup
    h = compress.settings_from(env)
    model, tokens = compress.load_model(artifact, h, env)[0], compress.validation_tokens(h, TARGETS)
    flags = (0, compress.FLAG_NGRAM, compress.FLAG_TTT)
    payloads = {compress.encode_tokens(compress.Distributions(model, h, tokens.clone(), f)) for f in flags}
    assert len(payloads) == 3


def test_text_file_round_trip(setup, capsys):
    root, env, artifact, _ = setup
    text = root / "t.txt"
    text.write_text("The river and the city were named in 1850.\nA new school!\n", encoding="utf-8")
    code, stdout, err = run(["encode", "--artifact", artifact, "--text", str(text), "-o", str(root / "t.pgc"),
                             "--json", "-"], env, capsys)
    assert code == 0, err
    assert json.loads(stdout[stdout.index("{"):])["decoded_identical"] is True


def test_corrupted_file_and_wrong_artifact_fail_in_one_line(setup, capsys):
    root, env, artifact, other = setup
    good = root / "small.pgc"
    assert run(["encode", "--artifact", artifact, "--tokens", "40", "--no-verify", "-o", str(good)], env, capsys)[0] == 0
    blob = bytearray(good.read_bytes())
    blob[len(blob) // 2] ^= 0x10
    bad = root / "bad.pgc"
    bad.write_bytes(bytes(blob))
    for path, art, needle in ((bad, artifact, "corrupted"), (good, other, "sha256 differs"),
                              (root / "missing.pgc", artifact, "cannot read")):
        code, _, err = run(["decode", "--artifact", art, str(path), "-o", str(root / "y.txt")], {}, capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (root / "y.txt").exists()


def test_refuses_settings_that_cannot_code(setup, capsys):
    root, env, artifact, _ = setup
    argv = ["encode", "--artifact", artifact, "--tokens", "10", "-o", str(root / "z.pgc")]
    for extra_env, extra_arg, needle in (({"COMPILE": "1"}, [], "eager CPU"),
                                         ({"NGRAM_MODE": "hashed"}, ["--ngram"], "do not sum to 1"),
                                         ({"MODEL_DIM": "32"}, [], "MODEL_DIM=32 (artifact: 64) conflict")):
        code, _, err = run(argv + extra_arg, dict(env, **extra_env), capsys)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (root / "z.pgc").exists()


def test_an_artifact_with_non_finite_weights_is_refused_not_blamed_on_the_machine(setup, capsys):
    root, env, _, _ = setup
    h = compress.settings_from(env)
    model = tg.build_model(h)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "attn_scale" in name:  # kept in float by the export: NaN survives into the artifact
                p.fill_(float("nan"))
    nan_artifact = root / "nan.ptz"
    nan_artifact.write_bytes(tg.pack_artifact(model.state_dict(), h)[0])
    out = root / "nan.pgc"
    code, _, err = run(["encode", "--artifact", str(nan_artifact), "--tokens", "10", "-o", str(out)], env, capsys)
    assert code == 2 and "logits are not finite" in err and "this machine" not in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_text_without_bytes_is_refused_before_anything_is_written(setup, capsys):
    root, env, artifact, _ = setup
    blank = root / "blank.txt"
    blank.write_text("\n \n\n", encoding="utf-8")
    out = root / "blank.pgc"
    code, _, err = run(["encode", "--artifact", artifact, "--text", str(blank), "-o", str(out)], env, capsys)
    assert code == 2 and "no byte of text" in err and len(err.strip().splitlines()) == 1, err  # was ZeroDivisionError
    assert not out.exists()
