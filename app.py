"""flaxtumor's web app (research use only): `python app.py [--checkpoints DIR] [--classifier DIR] [--segmenter DIR]
[--host H] [--port P] [--share] [--examples DIR]`. Everything lives in the `flaxtumor.app` package (`server` starts
it); this file is what Hugging Face Spaces runs."""

import sys
import time

STARTED = time.perf_counter()  # before the heavy imports, so the reported start-up time includes them

from flaxtumor.app.state import private_root  # noqa: E402

private_root()  # before Gradio is imported: some of its modules read their temp dir at import time

from flaxtumor.app.server import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(started=STARTED))
