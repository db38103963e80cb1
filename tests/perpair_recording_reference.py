"""``python -m perpair_recording_reference ARGS``: ``perpair ARGS``, each process appending the pairs its reference
pass computes to ``$PERPAIR_TEST_RECORD.RANK``, one line of token ids per pair (tests/test_train_cli.py: who
computes what under torchrun), and measuring a peak memory of RANK + 1 MiB (which process's the summary
reports). ``$PERPAIR_TEST_KILL=RANK:PAIRS``: process RANK is killed (SIGKILL: no handler runs) once its pass
computed PAIRS pairs, the pass saving what it computed after every forward. Not a test module."""

import os
import signal

import perpair.train.loop as loop
import perpair.train.reference as reference
from perpair.__main__ import main

computed = reference.logps_of_tokenized


def recording(model, tokenized, **options):
    with open(f"{os.environ['PERPAIR_TEST_RECORD']}.{os.environ.get('RANK', '0')}", "a") as handle:
        handle.write("".join(f"{t.prompt} {t.chosen} {t.rejected}\n" for t in tokenized))
    rank, pairs = map(int, os.environ.get("PERPAIR_TEST_KILL", "-1:0").split(":"))
    if rank == int(os.environ.get("RANK", "0")):
        progress = options["on_progress"]

        def killing(done):
            if progress:
                progress(done)
            if done >= pairs:
                os.kill(os.getpid(), signal.SIGKILL)

        options["on_progress"] = killing
        reference.SAVE_SECONDS = 0
    return computed(model, tokenized, **options)


reference.logps_of_tokenized = recording
loop.peak_memory_bytes = lambda device: (int(os.environ.get("RANK", "0")) + 1) * 2**20

if __name__ == "__main__":
    main()
