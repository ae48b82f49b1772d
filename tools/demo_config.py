"""The offline CPU demo configuration: exactly what run.sh's CPU branch exports (tests/test_config.py checks that),
as environment variables for train_gpt.py. Tools and tests take it from here; a tool that needs a shorter run
derives it with dict(CPU_DEMO_ENV, ITERATIONS=...)."""

CPU_DEMO_ENV = dict(
    DATA_PATH="./data/datasets/sample_sp1024", TOKENIZER_PATH="./data/tokenizers/sample_1024_bpe.model",
    DEVICE="cpu", COMPILE="0", NUM_LAYERS="4", MODEL_DIM="128", NUM_HEADS="4", NUM_KV_HEADS="2", XSA_LAST_N="2",
    BIGRAM_DIM="32", TRAIN_SEQ_LEN="256", EVAL_SEQ_LEN="256", EVAL_STRIDE="64", TRAIN_BATCH_TOKENS="8192",
    TRAIN_MICRO_BATCH_TOKENS="4096", ITERATIONS="200", WARMUP_STEPS="2", WARMDOWN_ITERS="80",
    MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="100", VAL_LAST_STEP="1", TRAIN_LOG_EVERY="50", SWA_EVERY="10",
    EMA_DECAY="0.98", VAL_MAX_TOKENS="131072", NGRAM_CHUNK_TOKENS="8192", KEEP_FLOAT_MAX_NUMEL="4096",
    ARTIFACT_PATH="final_model.int6.ptz")
